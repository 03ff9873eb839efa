"""The limits that govern a request: one :class:`LimitSpec` per configured limit and subject."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal

from .config import Budget, Governance, Rates, Spend, SpendLimits
from .periods import PeriodBounds, period_bounds

__all__ = ["LimitSpec", "budget_request", "key_specs", "tenant_specs", "user_specs"]

Kind = Literal["rate", "budget"]

# (window, bucket) in seconds of each sliding rate limit.
_WINDOWS: dict[str, tuple[float, float]] = {
    "requests_per_minute": (60.0, 1.0),
    "tokens_per_minute": (60.0, 1.0),
    "requests_per_day": (86_400.0, 60.0),
}
# Budget periods summed from the spend counters, by grain; others are read from the rows.
_GRAINS = {"1h": "h", "1d": "d", "7d": "d", "30d": "d", "1mo": "M"}


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One limit of one subject: what it counts, how much is allowed, and its lease key.

    ``scope`` is what a :class:`QuotaExceededError` reports: ``"tenant"``, ``"user"``,
    ``"system_keys"`` or a provider name; ``limit`` is the config key (``"max_usd"``,
    ``"requests_per_minute"``, ...).
    """

    key: str
    scope: str
    limit: str
    allowed: float
    kind: Kind
    tenant_id: uuid.UUID
    window_s: float = 0.0
    bucket_s: float = 0.0
    user_id: str | None = None
    subject: str = ""  # spend counters: '' the tenant, 's' its system-key use, 'k:<id>' a key
    key_id: str | None = None  # a virtual key's limits (scope "key")
    period: str = "1mo"
    anchor: date = date(1970, 1, 1)
    alert_at: tuple[float, ...] = ()  # budget fractions that fire an alert once per period

    @property
    def counts_tokens(self) -> bool:
        return self.limit == "tokens_per_minute"

    def bounds(self, at: datetime) -> PeriodBounds:
        return period_bounds(self.period, at, self.anchor)


def _rates(
    base: str,
    scope: str,
    tenant: uuid.UUID,
    rates: Rates,
    user: str | None = None,
    key_id: str | None = None,
) -> Iterator[LimitSpec]:
    for name, value in rates.rate_items():
        window, bucket = _WINDOWS[name]
        yield LimitSpec(
            key=f"{base}:{name}",
            scope=scope,
            limit=name,
            allowed=float(value),
            kind="rate",
            tenant_id=tenant,
            window_s=window,
            bucket_s=bucket,
            user_id=user,
            key_id=key_id,
        )


def _spend(
    base: str,
    scope: str,
    tenant: uuid.UUID,
    spend: Spend,
    subject: str,
    user: str | None = None,
    alert_at: tuple[float, ...] = (),
    key_id: str | None = None,
) -> Iterator[LimitSpec]:
    if spend.max_usd is None:
        return
    yield LimitSpec(
        key=f"{base}:max_usd:{spend.period}",
        scope=scope,
        limit="max_usd",
        allowed=spend.max_usd,
        kind="budget",
        tenant_id=tenant,
        user_id=user,
        subject=subject,
        period=spend.period,
        anchor=spend.anchor,
        alert_at=alert_at,
        key_id=key_id,
    )


def tenant_specs(
    tenant: uuid.UUID, gov: Governance, provider_quotas: dict[str, Rates] | None = None
) -> tuple[tuple[LimitSpec, ...], tuple[LimitSpec, ...], dict[str, tuple[LimitSpec, ...]]]:
    """The tenant-wide specs, the system-key specs, and each provider's quota specs."""
    base = f"t:{tenant}"
    whole: list[LimitSpec] = []
    if gov.budget is not None:
        budget: Budget = gov.budget
        whole.extend(_spend(base, "tenant", tenant, budget, "", alert_at=budget.alert_at))
    if gov.limits is not None:
        whole.extend(_rates(base, "tenant", tenant, gov.limits))
    system: list[LimitSpec] = []
    if gov.system_keys is not None:
        system.extend(_spend(f"{base}:s", "system_keys", tenant, gov.system_keys, "s"))
        system.extend(_rates(f"{base}:s", "system_keys", tenant, gov.system_keys))
    providers = {
        name: tuple(_rates(f"{base}:p:{name}", name, tenant, rates))
        for name, rates in (provider_quotas or {}).items()
    }
    return tuple(whole), tuple(system), {k: v for k, v in providers.items() if v}


def user_specs(tenant: uuid.UUID, gov: Governance, user_id: str) -> tuple[LimitSpec, ...]:
    """The specs of one end user of the tenant (``user_limits``)."""
    if gov.user_limits is None:
        return ()
    base = f"t:{tenant}:u:{user_id}"
    return (
        *_spend(base, "user", tenant, gov.user_limits, "", user_id),
        *_rates(base, "user", tenant, gov.user_limits, user_id),
    )


def key_specs(tenant: uuid.UUID, key_id: str, limits: SpendLimits) -> tuple[LimitSpec, ...]:
    """The specs of one virtual key of the tenant (a :class:`~.keys.KeyQuota`)."""
    base = f"t:{tenant}:k:{key_id}"
    return (
        *_spend(
            base,
            "key",
            tenant,
            limits,
            f"k:{key_id}",
            alert_at=getattr(limits, "alert_at", ()),  # KeyLimits has them
            key_id=key_id,
        ),
        *_rates(base, "key", tenant, limits, key_id=key_id),
    )


def budget_request(spec: LimitSpec, bounds: PeriodBounds, want: float) -> dict[str, Any]:
    """The renewal request of a budget lease (see ``llm_gateway_quota_renew``)."""
    request: dict[str, Any] = {
        "key": f"{spec.key}@{bounds.start.isoformat()}",
        "kind": "budget",
        "limit": spec.allowed,
        "tenant_id": str(spec.tenant_id),
        "subject": spec.subject,
        "start": bounds.start.isoformat(),
        "end": bounds.end.isoformat(),
        "want": want,
    }
    grain = _GRAINS.get(spec.period)
    if spec.user_id is not None or grain is None:
        # From the rows: a user's spend, or a period shorter than the counters' grain.
        request["source"] = "rows"
        request["user_id"] = spec.user_id
        request["system_only"] = spec.subject == "s"
        if spec.key_id is not None:
            request["virtual_key_id"] = spec.key_id  # read by migration 011's renewal
    else:
        request["grain"] = grain
    return request
