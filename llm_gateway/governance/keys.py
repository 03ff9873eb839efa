"""Per-key quotas: the budget and rate limits of one virtual key, enforced like a user's."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError, field_validator

from .config import SpendLimits, alert_fractions

__all__ = ["KeyLimits", "KeyQuota"]


class KeyLimits(SpendLimits):
    """A key's limits: ``user_limits``' shape (max_usd, period, anchor, the three rates) plus
    ``alert_at`` (its alerts have scope ``"key"`` and the key's id as ``user_id``)."""

    alert_at: tuple[float, ...] = ()

    @field_validator("alert_at", mode="before")
    @classmethod
    def _fractions(cls, value: object) -> object:
        return alert_fractions(value)


@dataclass(frozen=True, slots=True)
class KeyQuota:
    """What one virtual key may spend and how fast, for ``complete_for_tenant(key_quota=...)``.

    ``key_id`` is the key's record id (never the key itself): its budgets and rates are shared
    by every process through leases keyed by it, its usage rows carry it as ``virtual_key_id``,
    and a refusal has ``scope == "key"``. The router validates ``limits`` once per key (and
    again when they change); an invalid value raises ``ValueError`` naming its path.
    """

    key_id: str
    limits: Mapping[str, Any]

    def __post_init__(self) -> None:
        if isinstance(self.key_id, uuid.UUID):
            object.__setattr__(self, "key_id", str(self.key_id))
        if not isinstance(self.key_id, str) or not self.key_id:
            raise ValueError("KeyQuota.key_id must be a non-empty string")
        if not isinstance(self.limits, Mapping):
            raise ValueError("KeyQuota.limits must be a mapping")

    def parsed(self) -> KeyLimits:
        """The validated limits (``ValueError`` for an invalid one)."""
        try:
            return KeyLimits.model_validate(dict(self.limits))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            path = ".".join(str(p) for p in ("key_quota.limits", *first["loc"]))
            raise ValueError(f"invalid {path}: {first['msg']}") from None
