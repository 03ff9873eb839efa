"""The governance sections of ``inference_config`` and the router-wide ``default_limits``.

Sections: ``budget`` and ``limits`` govern the tenant as a whole, ``user_limits`` each ``user_id``
of the tenant, ``system_keys`` the tenant's use of system keys. A router's ``default_limits`` has
the same shape; a section the tenant sets replaces the default's section of that name.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .periods import Period

__all__ = [
    "Budget",
    "Governance",
    "Rates",
    "Spend",
    "SpendLimits",
    "alert_fractions",
    "parse_default_limits",
]

_Count = int | None


def _invalid(message: str) -> PydanticCustomError:
    # A custom error type: the message reads as written, without pydantic's "Value error,".
    return PydanticCustomError("governance", "{reason}", {"reason": message})


def alert_fractions(value: object) -> tuple[float, ...]:
    """``alert_at``: a list of fractions in (0, 1], sorted, each once."""
    if not isinstance(value, list | tuple):
        raise _invalid("must be a list of fractions such as [0.5, 0.8, 1.0]")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1:
            raise _invalid(f"each threshold must be a number in (0, 1], got {v!r}")
    return tuple(sorted(set(value)))


class Rates(BaseModel):
    """Sliding-window rate limits; ``None`` means no limit."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    requests_per_minute: _Count = Field(default=None, gt=0, strict=True)
    tokens_per_minute: _Count = Field(default=None, gt=0, strict=True)
    requests_per_day: _Count = Field(default=None, gt=0, strict=True)

    def rate_items(self) -> list[tuple[str, int]]:
        """The limits that are set, as (config key, value)."""
        return [
            (name, value)
            for name, value in (
                ("requests_per_minute", self.requests_per_minute),
                ("tokens_per_minute", self.tokens_per_minute),
                ("requests_per_day", self.requests_per_day),
            )
            if value is not None
        ]


class Spend(BaseModel):
    """An optional spending cap over a period."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    max_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    period: Period = "1mo"
    anchor: date = date(1970, 1, 1)

    @field_validator("max_usd", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        # JSON true/false or "5" are mistakes, not amounts.
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _invalid(f"must be a number of US dollars, got {type(value).__name__}")
        return value


class SpendLimits(Rates, Spend):
    """Rates plus an optional spending cap (``user_limits``, ``system_keys``)."""


class Budget(Spend):
    """The tenant's budget: ``max_usd`` per ``period``, with alerts and what to do when spent."""

    alert_at: tuple[float, ...] = ()
    allow_unpriced: StrictBool = False
    on_exhausted: Literal["refuse", "cheapest"] = "refuse"

    @field_validator("alert_at", mode="before")
    @classmethod
    def _fractions(cls, value: object) -> object:
        return alert_fractions(value)

    @model_validator(mode="after")
    def _needs_cap(self) -> Budget:
        if self.max_usd is None:
            raise _invalid("a budget needs max_usd")
        return self


class Governance(BaseModel):
    """The four governance sections of one tenant (or of a router's default)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    budget: Budget | None = None
    limits: Rates | None = None
    user_limits: SpendLimits | None = None
    system_keys: SpendLimits | None = None

    def merged_over(self, default: Governance | None) -> Governance:
        """This tenant's sections, and the default's for every section the tenant left unset."""
        if default is None:
            return self
        return Governance(
            budget=self.budget if self.budget is not None else default.budget,
            limits=self.limits if self.limits is not None else default.limits,
            user_limits=self.user_limits if self.user_limits is not None else default.user_limits,
            system_keys=self.system_keys if self.system_keys is not None else default.system_keys,
        )

    @property
    def empty(self) -> bool:
        return (
            self.budget is None
            and self.limits is None
            and self.user_limits is None
            and self.system_keys is None
        )


def parse_default_limits(value: Mapping[str, Any] | Governance | None) -> Governance | None:
    """Validate a router's ``default_limits=`` (raises pydantic's ``ValidationError``)."""
    if value is None or isinstance(value, Governance):
        return value
    return Governance.model_validate(value)
