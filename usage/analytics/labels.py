"""Validation of a request's ``session_id`` and ``tags`` (stored as columns of the ledger).

Both come from keyword arguments or from the caller's ``metadata`` (``"session_id"``,
``"tags"``); an explicit argument wins. They are validated before anything is sent, so a bad
one is the caller's error, never a dropped usage row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = [
    "MAX_SESSION_ID_LENGTH",
    "MAX_TAGS",
    "MAX_TAG_LENGTH",
    "InvalidLabelError",
    "labels_from",
    "validate_session_id",
    "validate_tags",
]

MAX_SESSION_ID_LENGTH: Final = 128
MAX_TAGS: Final = 16
MAX_TAG_LENGTH: Final = 64
# Printable, no spaces or quotes: ids and tags end up in CSV, shell commands and URLs.
_SESSION_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]*")
_TAG_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/=-]*")


class InvalidLabelError(ValueError):
    """A ``session_id`` or ``tags`` value the ledger does not accept; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


def validate_session_id(value: object) -> str | None:
    """``value`` if it is a valid session id (or ``None``); else :class:`InvalidLabelError`."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidLabelError("session_id", f"must be a string, not {type(value).__name__}")
    if not 1 <= len(value) <= MAX_SESSION_ID_LENGTH:
        raise InvalidLabelError(
            "session_id", f"must be 1 to {MAX_SESSION_ID_LENGTH} characters, not {len(value)}"
        )
    if not _SESSION_RE.fullmatch(value):
        raise InvalidLabelError(
            "session_id",
            "may contain only letters, digits and . _ : / @ + = - (starting with a letter or"
            f" digit): {value[:40]!r}",
        )
    return value


def validate_tags(value: object) -> list[str] | None:
    """The tags, de-duplicated in order (``None`` for none); else :class:`InvalidLabelError`."""
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidLabelError("tags", f"must be a list of strings, not {type(value).__name__}")
    tags: list[str] = []
    for tag in value:
        if not isinstance(tag, str):
            raise InvalidLabelError("tags", f"each tag must be a string, not {type(tag).__name__}")
        if not 1 <= len(tag) <= MAX_TAG_LENGTH:
            raise InvalidLabelError(
                "tags", f"each tag must be 1 to {MAX_TAG_LENGTH} characters: {tag[:40]!r}"
            )
        if not _TAG_RE.fullmatch(tag):
            raise InvalidLabelError(
                "tags",
                "a tag may contain only letters, digits and . _ : / = - (starting with a letter"
                f" or digit): {tag[:40]!r}",
            )
        if tag not in tags:
            tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise InvalidLabelError("tags", f"at most {MAX_TAGS} tags, got {len(tags)}")
    return tags or None


def labels_from(
    session_id: object, tags: object, metadata: Mapping[str, Any] | None
) -> tuple[str | None, list[str] | None]:
    """Validated ``(session_id, tags)``: the arguments, else the same keys of ``metadata``."""
    if metadata:
        if session_id is None:
            session_id = metadata.get("session_id")
        if tags is None:
            tags = metadata.get("tags")
    return validate_session_id(session_id), validate_tags(tags)
