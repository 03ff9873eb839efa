"""API keys as values that cannot leak: no repr, str or pickling shows the secret."""

from __future__ import annotations

import hashlib
from typing import Literal, NoReturn

KeySource = Literal["tenant", "system"]


class ApiKey:
    """An API key. ``repr``/``str`` show only a fingerprint; ``reveal()`` returns the secret.

    The fingerprint (first 12 hex chars of SHA-256) identifies a key in health state, logs and
    usage rows without disclosing it.
    """

    __slots__ = ("_value", "fingerprint", "source")

    def __init__(self, value: str, source: KeySource) -> None:
        if not value or not value.strip():
            raise ValueError("API key is empty")
        self._value = value.strip()
        self.source: KeySource = source
        self.fingerprint = hashlib.sha256(self._value.encode()).hexdigest()[:12]

    def reveal(self) -> str:
        """The secret itself, for the Authorization header only."""
        return self._value

    def __repr__(self) -> str:
        return f"ApiKey(source={self.source!r}, fingerprint={self.fingerprint!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ApiKey) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __reduce__(self) -> NoReturn:
        raise TypeError("ApiKey cannot be pickled")
