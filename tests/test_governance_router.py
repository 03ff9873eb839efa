"""Governance through the router: refusals before any attempt, steering quotas, free models,
user and system-key caps, default limits, status. Real PostgreSQL, simulated providers."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from llm_gateway import TenantLLMRouter, provider_settings
from llm_gateway.governance.errors import BudgetExceededError, QuotaExceededError
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import make_tenant

MSG = [{"role": "user", "content": "hello there"}]
PRICEY = "pricey-model"  # $1,000 per million tokens in and out: about 2 cents a request


@pytest.fixture
async def sims() -> AsyncIterator[tuple[SimulatedProvider, SimulatedProvider, SimulatedProvider]]:
    groq = SimulatedProvider(name="g", flavor="groq")
    llm7 = SimulatedProvider(name="l")
    local = SimulatedProvider(name="local")
    async with groq, llm7, local:
        yield groq, llm7, local


@pytest.fixture
async def pricey(pg: asyncpg.Connection) -> None:
    await pg.execute(
        "INSERT INTO model_prices (provider, model, input_per_m, output_per_m, effective_from)"
        " VALUES ('llm7', $1, 1000, 1000, '2000-01-01'), ('groq', $1, 1000, 1000, '2000-01-01')"
        " ON CONFLICT DO NOTHING",
        PRICEY,
    )


def providers(sims: Any, local: bool = False) -> dict[str, Any]:
    groq, llm7, loc = sims
    found = {
        "groq": provider_settings("groq", groq.root_url, api_key="sys-g"),
        "llm7": provider_settings("llm7", llm7.base_url, api_key="sys-l"),
    }
    if local:
        found["local"] = provider_settings("local", loc.base_url, default_model="tiny")
    return found


async def rows(pg: asyncpg.Connection, tenant: uuid.UUID) -> list[dict[str, Any]]:
    found = await pg.fetch(
        "SELECT * FROM model_usage_stats WHERE tenant_id = $1 ORDER BY timestamp, attempt",
        tenant,
    )
    return [{**r, "metadata": json.loads(r["metadata"] or "null")} for r in found]


async def spent(pg: asyncpg.Connection, tenant: uuid.UUID) -> float:
    value = await pg.fetchval(
        "SELECT coalesce(sum(estimated_cost_usd), 0) FROM model_usage_stats WHERE tenant_id = $1",
        tenant,
    )
    return float(value)


async def test_budget_refuses_before_any_attempt_and_records_the_refusal(
    pg_dsn: str, pg: asyncpg.Connection, sims: Any, pricey: None
) -> None:
    _, llm7, _ = sims
    t = await make_tenant(
        pg,
        inference_config={
            "preferred_provider": "llm7",
            "preferred_models": {"llm7": PRICEY},
            "budget": {"max_usd": 0.1, "period": "1d"},
        },
    )
    served = refused = 0
    async with TenantLLMRouter(pg_dsn, providers=providers(sims)) as router:
        for _ in range(40):
            try:
                await router.complete_for_tenant(t, MSG, max_tokens=20)
                served += 1
            except BudgetExceededError as exc:
                refused += 1
                error = exc
            await router.usage_tracker.flush()  # type: ignore[union-attr]
    assert served > 0 and refused > 0
    assert (error.scope, error.limit, error.allowed) == ("tenant", "max_usd", 0.1)
    assert 0 < error.retry_after <= 86_400 and error.resets_at > datetime.now(UTC)
    # No provider was contacted for a refused request.
    assert len(llm7.requests) == served
    worst = (len("hello there") // 4 + 20 + 10) * 1000 / 1e6  # generous: input + max_tokens
    assert await spent(pg, t) <= 0.1 + worst
    refusal = [r for r in await rows(pg, t) if r["status"] == "quota_exceeded"]
    assert len(refusal) == refused
    first = refusal[0]
    assert (first["provider"], first["model_name"]) == ("llm7", PRICEY)
    assert (first["input_tokens"], first["output_tokens"], first["latency_ms"]) == (0, 0, 0)
    assert first["estimated_cost_usd"] == 0
    assert "tenant max_usd" in first["error_message"]


async def test_free_local_model_is_served_when_the_budget_is_spent(
    pg_dsn: str, pg: asyncpg.Connection, sims: Any, pricey: None
) -> None:
    local = sims[2]
    t = await make_tenant(
        pg,
        inference_config={
            "preferred_provider": "llm7",
            "fallback_order": ["local"],
            "preferred_models": {"llm7": PRICEY},
            "budget": {"max_usd": 0.02},
        },
    )
    async with TenantLLMRouter(pg_dsn, providers=providers(sims, local=True)) as router:
        seen = []
        for _ in range(6):
            result = await router.complete_for_tenant(t, MSG, max_tokens=5)
            seen.append(result.provider)
            await router.usage_tracker.flush()  # type: ignore[union-attr]
    assert seen[0] == "llm7" and seen[-1] == "local"
    assert len(local.requests) >= 1


async def test_system_key_quota_steers_to_own_keys_and_spares_other_tenants(
    pg_dsn: str, pg: asyncpg.Connection, sims: Any
) -> None:
    capped = {"system_keys": {"requests_per_minute": 2}, "preferred_provider": "groq"}
    own = await make_tenant(pg, llm_tokens={"llm7": "own-l"}, inference_config=capped)
    keyless = await make_tenant(pg, inference_config=capped)
    other = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
    async with TenantLLMRouter(pg_dsn, providers=providers(sims)) as router:
        served = [(await router.complete_for_tenant(own, MSG)).key_source for _ in range(4)]
        assert served == ["system", "system", "tenant", "tenant"]
        explained = await router.explain(own)
        assert explained["excluded"]["groq"] == "system key quota: requests_per_minute reached"
        for _ in range(2):
            await router.complete_for_tenant(keyless, MSG)
        with pytest.raises(QuotaExceededError) as info:
            await router.complete_for_tenant(keyless, MSG)
        assert (info.value.scope, info.value.limit) == ("system_keys", "requests_per_minute")
        for _ in range(5):
            assert (await router.complete_for_tenant(other, MSG)).key_source == "system"
    refusals = [r for r in await rows(pg, keyless) if r["status"] == "quota_exceeded"]
    assert len(refusals) == 1 and refusals[0]["metadata"]["quota_scope"] == "system_keys"


async def test_provider_quota_moves_traffic_to_the_next_provider(
    pg_dsn: str, pg: asyncpg.Connection, sims: Any
) -> None:
    t = await make_tenant(
        pg,
        inference_config={
            "preferred_provider": "groq",
            "fallback_order": ["llm7"],
            "rate_limits": {"Groq": {"requests_per_minute": 2}},
        },
    )
    async with TenantLLMRouter(pg_dsn, providers=providers(sims)) as router:
        served = [(await router.complete_for_tenant(t, MSG)).provider for _ in range(4)]
        explained = await router.explain(t)
    assert served == ["groq", "groq", "llm7", "llm7"]
    assert explained["excluded"]["groq"] == "provider quota: requests_per_minute reached"


async def test_user_capped_while_the_tenant_is_not(
    pg_dsn: str, pg: asyncpg.Connection, sims: Any
) -> None:
    t = await make_tenant(pg, inference_config={"user_limits": {"requests_per_minute": 2}})
    async with TenantLLMRouter(pg_dsn, providers=providers(sims)) as router:
        for _ in range(2):
            await router.complete_for_tenant(t, MSG, user_id="alice")
        with pytest.raises(QuotaExceededError) as info:
            await router.complete_for_tenant(t, MSG, user_id="alice")
        assert info.value.scope == "user"
        await router.complete_for_tenant(t, MSG, user_id="bob")
        await router.complete_for_tenant(t, MSG)  # no user: user limits do not apply
        status = await router.quota_status(t, user_id="alice")
    [alice] = [s for s in status if s["scope"] == "user"]
    assert (alice["limit"], alice["allowed"], alice["used"]) == ("requests_per_minute", 2, 2)
    assert alice["remaining"] == 0


async def test_default_limits_apply_to_tenants_that_set_none(
    pg_dsn: str, pg: asyncpg.Connection, sims: Any
) -> None:
    plain = await make_tenant(pg)
    own_rule = await make_tenant(pg, inference_config={"limits": {"requests_per_minute": 5}})
    default = {"limits": {"requests_per_minute": 1}}
    async with TenantLLMRouter(pg_dsn, providers=providers(sims), default_limits=default) as router:
        await router.complete_for_tenant(plain, MSG)
        with pytest.raises(QuotaExceededError):
            await router.complete_for_tenant(plain, MSG)
        for _ in range(3):  # the tenant's own section replaces the default's
            await router.complete_for_tenant(own_rule, MSG)


async def test_quota_status_reports_each_limit(
    pg_dsn: str, pg: asyncpg.Connection, sims: Any, pricey: None
) -> None:
    t = await make_tenant(
        pg,
        inference_config={
            "preferred_provider": "llm7",
            "preferred_models": {"llm7": PRICEY},
            "budget": {"max_usd": 5, "period": "1mo"},
            "limits": {"requests_per_minute": 100},
        },
    )
    async with TenantLLMRouter(pg_dsn, providers=providers(sims)) as router:
        for _ in range(3):
            await router.complete_for_tenant(t, MSG, max_tokens=20)
        await router.usage_tracker.flush()  # type: ignore[union-attr]
        await asyncio.sleep(0.1)
        status = {s["limit"]: s for s in await router.quota_status(t)}
    cost = await spent(pg, t)
    assert set(status) == {"max_usd", "requests_per_minute"}
    assert status["max_usd"]["used"] == pytest.approx(cost, rel=1e-6)
    assert status["max_usd"]["resets_at"].day == 1
    assert status["requests_per_minute"]["used"] == 3
    for s in status.values():
        assert s["remaining"] == pytest.approx(s["allowed"] - s["used"] - s["reserved"])


def test_default_limits_are_validated() -> None:
    from llm_gateway import ConfigError

    with pytest.raises(ConfigError, match=r"default_limits\.budget\.max_usd"):
        TenantLLMRouter("postgresql://x@127.0.0.1/y", default_limits={"budget": {"max_usd": "a"}})


async def test_rate_limit_status_reports_what_the_router_acts_on(
    pg_dsn: str, pg: asyncpg.Connection, sims: Any
) -> None:
    from usage.stats import check_rate_limit_status

    t = await make_tenant(
        pg,
        inference_config={
            "preferred_provider": "groq",
            "fallback_order": ["llm7"],
            "rate_limits": {"groq": {"requests_per_minute": 3}},
        },
    )
    async with TenantLLMRouter(pg_dsn, providers=providers(sims)) as router:
        served = [(await router.complete_for_tenant(t, MSG)).provider for _ in range(5)]
        pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
        try:
            status = await check_rate_limit_status(pool, t, "Groq")
        finally:
            await pool.close()
    assert served == ["groq"] * 3 + ["llm7"] * 2
    # Three admitted, and the two refused by the quota are not counted, whatever rows exist.
    assert status.requests_last_minute == 3
    assert status.limits.requests_per_minute == 3
    assert status.should_failover and status.status == "critical"


async def test_limits_govern_model_group_routes_too(
    pg_dsn: str, pg: asyncpg.Connection, sims: Any
) -> None:
    t = await make_tenant(
        pg,
        inference_config={
            "limits": {"requests_per_minute": 2},
            "model_groups": {"smart": [{"provider": "llm7", "model": "gpt-4o-mini"}]},
        },
    )
    async with TenantLLMRouter(pg_dsn, providers=providers(sims)) as router:
        await router.complete_for_tenant(t, MSG)
        await router.complete_for_tenant(t, MSG, model="smart")
        with pytest.raises(QuotaExceededError):
            await router.complete_for_tenant(t, MSG, model="smart")
        with pytest.raises(QuotaExceededError):
            await router.complete_for_tenant(t, MSG, model="gpt-4o-mini")


async def test_a_router_without_usage_rows_prices_its_budgets_from_model_prices(
    pg_dsn: str, pg: asyncpg.Connection, sims: Any, pricey: None
) -> None:
    """``record_usage=False`` starts no usage tracker, which is what loaded ``model_prices``: the
    router loads them itself, so a model priced only there is admitted and charged."""
    from usage.pricing import PriceBook

    t = await make_tenant(
        pg,
        inference_config={
            "preferred_provider": "llm7",
            "preferred_models": {"llm7": PRICEY},
            "budget": {"max_usd": 0.05, "period": "1d"},
        },
    )
    book = PriceBook()  # shipped prices only, until someone loads the table into it
    router = TenantLLMRouter(pg_dsn, providers=providers(sims), record_usage=False, price_book=book)
    async with router:
        result = await router.complete_for_tenant(t, MSG, max_tokens=20)
        assert result.provider == "llm7" and result.cost is not None and result.cost > 0
        with pytest.raises(BudgetExceededError):  # about 2 cents a request, within the process
            for _ in range(10):
                await router.complete_for_tenant(t, MSG, max_tokens=20)
