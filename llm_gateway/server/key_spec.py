"""Validation of what a new virtual key grants: user, name, models, limits and expiry.

Each check returns the value as stored, or raises
:class:`~llm_gateway.errors.VirtualKeySpecError` naming the field and what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from ..errors import VirtualKeySpecError
from ..governance.config import SpendLimits

__all__ = ["LIMIT_FIELDS", "check_expiry", "check_limits", "check_models", "check_text"]

# The governance user_limits shape (llm_gateway.governance.config.SpendLimits) plus alert_at.
LIMIT_FIELDS = (
    "max_usd",
    "period",
    "anchor",
    "alert_at",
    "requests_per_minute",
    "tokens_per_minute",
    "requests_per_day",
)


def check_text(field: str, value: str | None, longest: int) -> str | None:
    """``None``, or a string of 1..``longest`` printable characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise VirtualKeySpecError(field, f"must be a string, got {type(value).__name__}")
    if not value or not value.strip():
        raise VirtualKeySpecError(field, "is empty (leave it out instead)")
    if len(value) > longest:
        raise VirtualKeySpecError(field, f"is {len(value)} characters long (at most {longest})")
    if not value.isprintable():
        raise VirtualKeySpecError(field, "contains control characters")
    return value


def check_models(models: Iterable[str] | None) -> list[str] | None:
    """``None`` (any model), or a non-empty list of distinct model ids or group names."""
    if models is None:
        return None
    if isinstance(models, str | bytes) or not isinstance(models, Iterable):
        raise VirtualKeySpecError("models", "must be a list of model names, not a single string")
    found: list[str] = []
    for model in models:
        if not isinstance(model, str) or not model.strip():
            raise VirtualKeySpecError("models", f"each model must be a non-empty string: {model!r}")
        if (
            any(c.isspace() or c == "," for c in model)
            or len(model) > 200
            or not model.isprintable()
        ):
            raise VirtualKeySpecError(
                "models", f"not a model name: {model[:60]!r} (no spaces, commas; <= 200 chars)"
            )
        if model not in found:
            found.append(model)
    if not found:
        raise VirtualKeySpecError("models", "is empty: leave it out to allow every model")
    return found


def check_limits(limits: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``None``, or limits in the shape of the governance ``user_limits``, as stored."""
    if limits is None:
        return None
    if not isinstance(limits, Mapping):
        raise VirtualKeySpecError("limits", f"must be an object, got {type(limits).__name__}")
    unknown = sorted(str(k) for k in limits if k not in LIMIT_FIELDS)
    if unknown:
        raise VirtualKeySpecError(
            "limits", f"unknown field(s) {', '.join(unknown)} (known: {', '.join(LIMIT_FIELDS)})"
        )
    if not limits:
        return None
    rest = {k: v for k, v in limits.items() if k != "alert_at"}
    try:
        parsed = SpendLimits.model_validate(rest)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "limits"
        raise VirtualKeySpecError(f"limits.{where}", first["msg"]) from None
    doc: dict[str, Any] = dict(parsed.rate_items())
    if parsed.max_usd is not None:
        doc["max_usd"] = parsed.max_usd
        doc["period"] = parsed.period
        if "anchor" in limits:  # the start of 7d / 30d periods
            doc["anchor"] = parsed.anchor.isoformat()
    elif any(k in limits for k in ("period", "anchor", "alert_at")):
        raise VirtualKeySpecError("limits", "period, anchor and alert_at need max_usd")
    if "alert_at" in limits:
        doc["alert_at"] = _fractions(limits["alert_at"])
    return doc


def _fractions(value: object) -> list[float]:
    if not isinstance(value, list | tuple):
        raise VirtualKeySpecError("limits.alert_at", "must be a list such as [0.5, 0.8, 1.0]")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1:
            raise VirtualKeySpecError(
                "limits.alert_at", f"each threshold must be a number in (0, 1], got {v!r}"
            )
        if not math.isfinite(v):
            raise VirtualKeySpecError("limits.alert_at", f"not a finite number: {v!r}")
    return sorted({float(v) for v in value})


def check_expiry(expires_at: datetime | None, now: datetime) -> datetime | None:
    """``None`` (never), or a timezone-aware instant after ``now``."""
    if expires_at is None:
        return None
    if not isinstance(expires_at, datetime):
        raise VirtualKeySpecError(
            "expires_at", f"must be a datetime, got {type(expires_at).__name__}"
        )
    if expires_at.tzinfo is None or expires_at.utcoffset() is None:
        raise VirtualKeySpecError("expires_at", "needs a time zone (e.g. 2027-01-31T00:00:00Z)")
    if expires_at <= now:
        raise VirtualKeySpecError("expires_at", f"{expires_at.isoformat()} is not in the future")
    return expires_at
