"""Admission against real PostgreSQL: budgets, rates, steering quotas, shared leases."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from llm_gateway.governance.admission import Governor, QuotaPlan
from llm_gateway.governance.config import Governance, Rates
from llm_gateway.governance.errors import BudgetExceededError, QuotaExceededError
from llm_gateway.governance.leases import LeaseClient
from llm_gateway.governance.limits import tenant_specs, user_specs


@dataclass(frozen=True)
class Entry:
    provider: str
    key_source: str = "tenant"
    price_per_m: tuple[float, float] | None = (1.0, 2.0)


PRICED = Entry("groq")  # 1,000 in + 1,000 out = $0.003
FREE = Entry("local", "none", (0.0, 0.0))


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    try:
        yield p
    finally:
        await p.close()


def governor(pool: Any, **kw: Any) -> Governor:
    return Governor(LeaseClient(lambda: pool), **kw)


def plan_of(
    raw: dict[str, Any], quotas: dict[str, Rates] | None = None
) -> tuple[uuid.UUID, QuotaPlan]:
    tenant = uuid.uuid4()
    gov = Governance.model_validate(raw)
    whole, system, providers = tenant_specs(tenant, gov, quotas)
    budget = gov.budget
    return tenant, QuotaPlan(
        whole,
        system,
        providers,
        allow_unpriced=bool(budget and budget.allow_unpriced),
        on_exhausted=budget.on_exhausted if budget else "refuse",
    )


async def test_budget_reservations_refuse_before_overspending(pool: asyncpg.Pool) -> None:
    _, plan = plan_of({"budget": {"max_usd": 0.01, "period": "1d"}})
    g = governor(pool)
    admitted = [await g.admit(plan, (), [PRICED], 1000, 1000) for _ in range(3)]
    with pytest.raises(BudgetExceededError) as info:
        await g.admit(plan, (), [PRICED], 1000, 1000)
    err = info.value
    assert (err.scope, err.limit, err.allowed) == ("tenant", "max_usd", 0.01)
    assert err.used == pytest.approx(0.009)
    assert 0 < err.retry_after <= 86_400 and err.resets_at.hour == 0
    # Ending one request frees its reservation; its real cost stays until its row is written.
    g.charge(admitted[0], uuid.uuid4(), 0.001, system_key=False)
    g.release(admitted[0])
    assert (await g.admit(plan, (), [PRICED], 1000, 1000)).entries == [PRICED]


async def test_free_models_stay_available_and_cheapest_fallback(pool: asyncpg.Pool) -> None:
    _, plan = plan_of({"budget": {"max_usd": 0.004}})
    g = governor(pool)
    await g.admit(plan, (), [PRICED, FREE], 1000, 1000)
    assert (await g.admit(plan, (), [PRICED, FREE], 1000, 1000)).entries == [FREE]
    with pytest.raises(BudgetExceededError):
        await g.admit(plan, (), [PRICED], 1000, 1000)
    cheap = Entry("llm7", price_per_m=(0.1, 0.2))  # $0.0003
    _, plan = plan_of({"budget": {"max_usd": 0.004, "on_exhausted": "cheapest"}})
    await g.admit(plan, (), [PRICED, cheap], 1000, 1000)
    assert (await g.admit(plan, (), [PRICED, cheap], 1000, 1000)).entries == [cheap]


async def test_unpriced_models_are_not_admitted_under_a_budget(pool: asyncpg.Pool) -> None:
    unpriced = Entry("openrouter", price_per_m=None)
    _, plan = plan_of({"budget": {"max_usd": 1.0}})
    g = governor(pool)
    assert (await g.admit(plan, (), [unpriced, PRICED], 10, 10)).entries == [PRICED]
    with pytest.raises(BudgetExceededError, match="no model with a known price"):
        await g.admit(plan, (), [unpriced], 10, 10)
    _, plan = plan_of({"budget": {"max_usd": 1.0, "allow_unpriced": True}})
    assert (await g.admit(plan, (), [unpriced], 10, 10)).entries == [unpriced]


async def test_rpm_refuses_with_retry_after(pool: asyncpg.Pool) -> None:
    _, plan = plan_of({"limits": {"requests_per_minute": 5}})
    g = governor(pool)
    for _ in range(5):
        await g.admit(plan, (), [PRICED], 10, 10)
    with pytest.raises(QuotaExceededError) as info:
        await g.admit(plan, (), [PRICED], 10, 10)
    assert not isinstance(info.value, BudgetExceededError)
    assert (info.value.scope, info.value.limit, info.value.used) == (
        "tenant",
        "requests_per_minute",
        5,
    )
    assert 1 <= info.value.retry_after <= 62


async def test_user_capped_while_tenant_is_not(pool: asyncpg.Pool) -> None:
    tenant, plan = plan_of({"user_limits": {"requests_per_minute": 2}})
    gov = Governance.model_validate({"user_limits": {"requests_per_minute": 2}})
    alice, bob = user_specs(tenant, gov, "alice"), user_specs(tenant, gov, "bob")
    g = governor(pool)
    for _ in range(2):
        await g.admit(plan, alice, [PRICED], 10, 10)
    with pytest.raises(QuotaExceededError) as info:
        await g.admit(plan, alice, [PRICED], 10, 10)
    assert info.value.scope == "user"
    await g.admit(plan, bob, [PRICED], 10, 10)


async def test_system_key_quota_steers_to_own_keys_then_refuses(pool: asyncpg.Pool) -> None:
    _, plan = plan_of({"system_keys": {"requests_per_minute": 2}})
    system = Entry("groq", "system")
    own = Entry("llm7", "tenant")
    g = governor(pool)
    for _ in range(2):
        assert (await g.admit(plan, (), [system, own], 10, 10)).entries == [system, own]
    admission = await g.admit(plan, (), [system, own], 10, 10)
    assert admission.entries == [own]
    assert admission.excluded == {"groq": "system key quota: requests_per_minute reached"}
    with pytest.raises(QuotaExceededError) as info:
        await g.admit(plan, (), [system], 10, 10)
    assert info.value.scope == "system_keys"


async def test_provider_quota_moves_traffic_to_the_next_provider(pool: asyncpg.Pool) -> None:
    _, plan = plan_of({}, {"groq": Rates(requests_per_minute=3)})
    other = Entry("llm7")
    g = governor(pool)
    for _ in range(3):
        assert (await g.admit(plan, (), [PRICED, other], 10, 10)).entries[0] == PRICED
    admission = await g.admit(plan, (), [PRICED, other], 10, 10)
    assert admission.entries == [other] and "groq" in admission.excluded


async def test_two_processes_share_one_rpm(pool: asyncpg.Pool) -> None:
    _, plan = plan_of({"limits": {"requests_per_minute": 10}})
    a, b = governor(pool), governor(pool)
    admitted = 0
    for i in range(30):
        try:
            await (a if i % 2 else b).admit(plan, (), [PRICED], 10, 10)
            admitted += 1
        except QuotaExceededError:
            pass
    assert admitted == 10


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_database_down_policies(policy: str) -> None:
    dead = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/x", min_size=0)
    _, plan = plan_of({"limits": {"requests_per_minute": 5}})
    g = governor(dead, on_db_error=policy)
    if policy == "open":
        assert (await g.admit(plan, (), [PRICED], 10, 10)).entries == [PRICED]
        assert g.opened == 1
    else:
        with pytest.raises(QuotaExceededError):
            await g.admit(plan, (), [PRICED], 10, 10)
    await dead.close()


async def test_budget_alerts_fire_once_across_processes(
    pool: asyncpg.Pool, pg: Any, pg_dsn: str
) -> None:
    import asyncio
    from datetime import UTC, datetime
    from decimal import Decimal

    from llm_gateway.governance.alerts import AlertSink

    tenant, _ = plan_of({})
    gov = Governance.model_validate({"budget": {"max_usd": 0.01, "alert_at": [0.5, 0.9, 1.0]}})
    whole, system, providers = tenant_specs(tenant, gov)
    plan = QuotaPlan(whole, system, providers)
    await pg.execute(
        "INSERT INTO model_usage_stats (id, tenant_id, provider, model_name, latency_ms,"
        " estimated_cost_usd, status, timestamp)"
        " VALUES ($1, $2, 'groq', 'm', 1, $3, 'success', $4)",
        uuid.uuid4(),
        tenant,
        Decimal("0.006"),
        datetime.now(UTC),
    )
    notices: list[str] = []
    listener = await asyncpg.connect(pg_dsn)
    await listener.add_listener("llm_gateway_events", lambda *a: notices.append(a[3]))
    events: list[dict[str, Any]] = []

    async def on_event(event: dict[str, Any]) -> None:
        events.append(event)

    sinks = [AlertSink(lambda: pool, on_event) for _ in range(4)]
    governors = [governor(pool, alerts=s) for s in sinks]
    # $0.003 a request: after the $0.006 already spent, one fits; its renewal sees 60 %.
    await governors[0].admit(plan, (), [PRICED], 1000, 1000)
    await sinks[0].drain()
    assert [e["threshold"] for e in events] == [0.5] and events[0]["type"] == "budget_alert"
    # The others refuse: the first refusal fires 1.0; 0.5 and 1.0 are not fired again.
    for g in governors[1:]:
        with pytest.raises(BudgetExceededError):
            await g.admit(plan, (), [PRICED], 1000, 1000)
    for s in sinks:
        await s.drain()
    rows = await pg.fetch(
        "SELECT scope, user_id, threshold, spent_usd, max_usd FROM budget_events"
        " WHERE tenant_id = $1 ORDER BY threshold",
        tenant,
    )
    assert [(r["scope"], r["user_id"], r["threshold"]) for r in rows] == [
        ("tenant", None, 0.5),
        ("tenant", None, 1.0),
    ]
    assert sorted(e["threshold"] for e in events) == [0.5, 1.0]
    for _ in range(50):
        if len(notices) >= 2:
            break
        await asyncio.sleep(0.05)
    assert sorted(json_threshold(n) for n in notices) == [0.5, 1.0]
    await listener.close()


def json_threshold(payload: str) -> float:
    import json

    body = json.loads(payload)
    assert body["type"] == "budget_alert"
    return float(body["threshold"])


async def test_a_refused_process_keeps_no_partial_grant(pool: asyncpg.Pool) -> None:
    """A renewal short of what a request needs grants what is left; the refused process gives
    that back at once, so another process whose own room plus it covers a request admits it
    (before: it stayed in the refused process's lease, and both refused with the budget unspent).
    """
    _, plan = plan_of({"budget": {"max_usd": 0.01, "period": "1d"}})
    a, b = governor(pool), governor(pool)
    cost_tokens = (1000, 1500)  # $0.004 reserved per request
    a1 = await a.admit(plan, (), [PRICED], *cost_tokens)
    await b.admit(plan, (), [PRICED], *cost_tokens)
    with pytest.raises(BudgetExceededError):  # $0.002 left: B is short
        await b.admit(plan, (), [PRICED], *cost_tokens)
    # a1 cost $0.002: $0.002 pending in A, $0.004 reserved in B, $0.004 unspent.
    a.charge(a1, uuid.uuid4(), 0.002, system_key=False)
    a.release(a1)
    assert (await a.admit(plan, (), [PRICED], *cost_tokens)).entries == [PRICED]
