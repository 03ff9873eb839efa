"""The router's side of governance: a tenant's quota plan, admission of a request, its refusal
row, settling what each attempt cost, and ``quota_status``."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..errors import ConfigError
from .admission import Admission, Governor, OnDbError, QuotaPlan
from .alerts import AlertSink, BudgetEventCallback
from .config import Governance, Rates, parse_default_limits
from .errors import QuotaExceededError
from .keys import KeyQuota
from .leases import LeaseClient
from .limits import LimitSpec, key_specs, tenant_specs, user_specs

if TYPE_CHECKING:
    import asyncpg

    from ..chain import ChainEntry
    from ..config import TenantConfig
    from ..ledger import RequestLedger

__all__ = ["DEFAULT_MAX_TOKENS", "QuotaGate", "estimate_input_tokens"]

# A request without max_tokens reserves this many output tokens (its worst case for budgets).
DEFAULT_MAX_TOKENS = 1024
_NO_SPECS: tuple[LimitSpec, ...] = ()
_MAX_USERS = 100_000  # user specs cached per plan; past it the cache starts over


def estimate_input_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """About four characters a token, over the text parts of the messages (no I/O)."""
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
    return chars // 4 + 4 * len(messages) + 1


class QuotaGate:
    """Admission for the router: plans per config load, user specs cached, rows for refusals."""

    def __init__(self, governor: Governor, default: Governance | None) -> None:
        self.governor = governor
        self.default = default
        # Tenants without limits of their own, whose requests carry a key quota: an empty
        # plan each (it holds the key's specs and draws).
        self._bare: dict[uuid.UUID, QuotaPlan] = {}

    @classmethod
    def build(
        cls,
        pool: Callable[[], asyncpg.Pool],
        default_limits: Mapping[str, Any] | None,
        on_db_error: OnDbError,
        on_budget_event: BudgetEventCallback | None,
    ) -> QuotaGate:
        """A router's gate: leases and budget alerts through ``pool``, ``default_limits`` under
        every tenant's own (invalid: :class:`ConfigError` naming the field)."""
        try:
            default = parse_default_limits(default_limits)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            path = ".".join(str(p) for p in ("default_limits", *first["loc"]))
            raise ConfigError(f"invalid {path}: {first['msg']}") from None
        alerts = AlertSink(pool, on_budget_event)
        return cls(Governor(LeaseClient(pool), on_db_error=on_db_error, alerts=alerts), default)

    def bare(self, tenant: uuid.UUID) -> QuotaPlan:
        """The empty plan of a tenant that sets no limits (for its keys' quotas)."""
        plan = self._bare.get(tenant)
        if plan is None:
            if len(self._bare) >= _MAX_USERS:
                self._bare.clear()
            plan = self._bare[tenant] = QuotaPlan()
        return plan

    def plan(self, config: TenantConfig) -> QuotaPlan | None:
        """The quota plan of a tenant's config merged over the router's default (per load)."""
        inference = config.inference
        gov = inference.governance().merged_over(self.default)
        quotas: dict[str, Rates] = dict(inference.rate_limits)
        whole, system, providers = tenant_specs(config.tenant_id, gov, quotas)
        if not (whole or system or providers or gov.user_limits is not None):
            return None
        budget = gov.budget
        return QuotaPlan(
            whole,
            system,
            providers,
            allow_unpriced=bool(budget and budget.allow_unpriced),
            on_exhausted=budget.on_exhausted if budget else "refuse",
            governance=gov,
        )

    def _user_specs(
        self, plan: QuotaPlan, tenant: uuid.UUID, user: str | None
    ) -> tuple[LimitSpec, ...]:
        if user is None:
            return _NO_SPECS
        specs = plan.users.get(user)  # cached with the plan: dropped when the config reloads
        if specs is None:
            gov = plan.governance
            specs = _NO_SPECS if gov is None else user_specs(tenant, gov, user)
            if len(plan.users) >= _MAX_USERS:
                plan.users.clear()
            plan.users[user] = specs
        return specs

    def _specs(
        self, plan: QuotaPlan, tenant: uuid.UUID, user: str | None, quota: KeyQuota | None
    ) -> tuple[LimitSpec, ...]:
        """The user's specs, then the key's (validated once per key and limits)."""
        specs = self._user_specs(plan, tenant, user)
        if quota is None:
            return specs
        index = (user, quota.key_id)
        cached = plan.keyed.get(index)
        if cached is not None and cached[0] == quota.limits:
            return cached[1]
        specs = (*specs, *key_specs(tenant, quota.key_id, quota.parsed()))
        if len(plan.keyed) >= _MAX_USERS:
            plan.keyed.clear()
        plan.keyed[index] = (dict(quota.limits), specs)
        return specs

    async def admit(
        self,
        plan: QuotaPlan,
        tenant: uuid.UUID,
        user: str | None,
        chain: list[ChainEntry],
        tokens_in: int,
        params: Mapping[str, Any],
        ledger: RequestLedger,
        key_quota: KeyQuota | None = None,
    ) -> Admission:
        """Admit the request on ``chain`` or record its refusal and raise it.

        ``key_quota``: the limits of the virtual key the request came with (scope ``"key"``).
        """
        max_tokens = params.get("max_tokens")
        if max_tokens is None:
            max_tokens = params.get("max_completion_tokens")
        tokens_out = (
            max_tokens if isinstance(max_tokens, int) and max_tokens >= 0 else DEFAULT_MAX_TOKENS
        )
        specs = self._specs(plan, tenant, user, key_quota)
        governor = self.governor
        admission = governor.admit_now(plan, specs, chain, tokens_in, tokens_out)
        if admission is not None:  # the cached path: no await, no I/O
            ledger.on_cost = self._charger(admission)
            return admission
        try:
            admission = await governor.admit(plan, specs, chain, tokens_in, tokens_out)
        except QuotaExceededError as refusal:
            first = chain[0]
            ledger.record(
                first,
                "quota_exceeded",
                0.0,
                input_tokens=0,
                output_tokens=0,
                message=f"{refusal.scope} {refusal.limit}: {refusal}",
                extra={"quota_scope": refusal.scope, "quota_limit": refusal.limit},
            )
            raise
        ledger.on_cost = self._charger(admission)
        return admission

    def _charger(self, admission: Admission) -> Callable[[uuid.UUID, Any, bool], None]:
        governor = self.governor

        def charge(usage_id: uuid.UUID, cost: Any, system_key: bool) -> None:
            governor.charge(admission, usage_id, float(cost) if cost else None, system_key)

        return charge

    async def close(self) -> None:
        """Give the leases back and send pending budget alerts (router shutdown)."""
        await self.governor.close()
        if self.governor.alerts is not None:
            await self.governor.alerts.drain()

    def release(self, admission: Admission | None, tokens_used: int | None) -> None:
        if admission is not None:
            self.governor.release(admission, tokens_used)

    async def status(
        self,
        plan: QuotaPlan | None,
        tenant: uuid.UUID,
        user: str | None,
        key_quota: KeyQuota | None = None,
    ) -> list[dict[str, Any]]:
        """One dict per configured limit: scope, limit, allowed, used, reserved, remaining,
        resets_at (fresh from PostgreSQL: the leases are renewed first); the key's limits
        (scope ``"key"``) with ``key_quota``."""
        if plan is None:
            if key_quota is None:
                return []
            plan = self.bare(tenant)
        specs = [
            *plan.whole,
            *self._specs(plan, tenant, user, key_quota),
            *plan.system,
            *(s for group in plan.providers.values() for s in group),
        ]
        governor = self.governor
        at = datetime.now(UTC)
        await governor.refresh([governor.lease(s, at) for s in specs])
        out = []
        for spec in specs:
            lease = governor.lease(spec, at)
            own = lease.unreported if spec.kind == "rate" else lease.reserved + lease.pending
            reserved = lease.others + (lease.reserved if spec.kind == "budget" else 0.0)
            used = lease.committed + (own - lease.reserved if spec.kind == "budget" else own)
            if spec.kind == "budget":
                resets_at = (lease.bounds or spec.bounds(at)).end
            else:
                resets_at = governor.rate_resets_at(lease, at)
            out.append(
                {
                    "scope": spec.scope,
                    "limit": spec.limit,
                    "allowed": spec.allowed,
                    "used": used,
                    "reserved": reserved,
                    "remaining": max(0.0, spec.allowed - used - reserved),
                    "resets_at": resets_at,
                    **({"user_id": spec.user_id} if spec.user_id else {}),
                    **({"key_id": spec.key_id} if spec.key_id else {}),
                }
            )
        return out
