"""Per-key quotas (virtual keys): a key's rpm and budget, shared by every router through
leases, refusals with scope "key", and usage rows that carry the key's id."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from llm_gateway import KeyQuota, TenantLLMRouter, provider_settings
from llm_gateway.governance.errors import BudgetExceededError, QuotaExceededError
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import make_tenant

MSG = [{"role": "user", "content": "hello there"}]
PRICEY = "pricey-model"  # $1,000 per million tokens: about a cent a request, 2.7 reserved


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedProvider]:
    async with SimulatedProvider(name="l") as provider:
        yield provider


async def _tenant(pg: asyncpg.Connection, **config: Any) -> uuid.UUID:
    await pg.execute(
        "INSERT INTO model_prices (provider, model, input_per_m, output_per_m, effective_from)"
        " VALUES ('llm7', $1, 1000, 1000, '2000-01-01') ON CONFLICT DO NOTHING",
        PRICEY,
    )
    return await make_tenant(
        pg,
        inference_config={"preferred_provider": "llm7", "preferred_models": {"llm7": PRICEY}}
        | config,
    )


def _router(dsn: str, sim: SimulatedProvider, **kw: Any) -> TenantLLMRouter:
    settings = {"llm7": provider_settings("llm7", sim.base_url, api_key="sys-l")}
    return TenantLLMRouter(dsn, providers=settings, **kw)


async def _rows(pg: asyncpg.Connection, tenant: uuid.UUID) -> list[asyncpg.Record]:
    return await pg.fetch(
        "SELECT status, virtual_key_id, error_message, estimated_cost_usd"
        " FROM model_usage_stats WHERE tenant_id = $1 ORDER BY timestamp",
        tenant,
    )


async def test_a_keys_rpm_refuses_it_while_another_key_of_the_tenant_is_served(
    pg_dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider
) -> None:
    t = await _tenant(pg)  # no limits of its own: only the keys' quotas govern
    a = KeyQuota(str(uuid.uuid4()), {"requests_per_minute": 3})
    b = KeyQuota(str(uuid.uuid4()), {"requests_per_minute": 3})
    async with _router(pg_dsn, sim) as router:
        for _ in range(3):
            await router.complete_for_tenant(t, MSG, max_tokens=20, key_quota=a)
        with pytest.raises(QuotaExceededError) as info:
            await router.complete_for_tenant(t, MSG, max_tokens=20, key_quota=a)
        assert (info.value.scope, info.value.limit, info.value.allowed) == (
            "key",
            "requests_per_minute",
            3,
        )
        with pytest.raises(QuotaExceededError, match="key quota exceeded"):
            await router.stream_for_tenant(t, MSG, max_tokens=20, key_quota=a)
        for _ in range(3):  # the other key has its own window
            await router.complete_for_tenant(t, MSG, max_tokens=20, key_quota=b)
        await router.complete_for_tenant(t, MSG, max_tokens=20)  # and the tenant none
        await router.usage_tracker.flush()  # type: ignore[union-attr]
        # The key's limits are listed with its id; the tenant sets none of its own.
        [status] = await router.quota_status(t, key_quota=a)
        assert (status["scope"], status["limit"], status["key_id"]) == (
            "key",
            "requests_per_minute",
            a.key_id,
        )
        assert (status["allowed"], status["used"], status["remaining"]) == (3, 3, 0)
        assert await router.quota_status(t) == []
    assert len(sim.requests) == 7  # refused requests reached no provider
    found = [(r["status"], r["virtual_key_id"]) for r in await _rows(pg, t)]
    assert found.count(("success", a.key_id)) == 3
    assert found.count(("quota_exceeded", a.key_id)) == 2
    assert found.count(("success", b.key_id)) == 3
    assert found.count(("success", None)) == 1
    refusal = next(r for r in await _rows(pg, t) if r["status"] == "quota_exceeded")
    assert refusal["error_message"].startswith("key requests_per_minute")


async def test_a_keys_budget_is_shared_by_every_router_through_the_spend_counters(
    pg_dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider
) -> None:
    """Key A spends its budget in one router; a second router (another holder, as another
    process is) refuses A from what the usage rows counted, and still serves key B."""
    t = await _tenant(pg, limits={"requests_per_minute": 1000})
    a = KeyQuota(str(uuid.uuid4()), {"max_usd": 0.05, "period": "1d", "alert_at": [0.5, 1.0]})
    b = KeyQuota(str(uuid.uuid4()), {"max_usd": 0.05, "period": "1d"})
    served = 0
    events: list[dict[str, Any]] = []
    async with _router(pg_dsn, sim, on_budget_event=events.append) as first:
        with pytest.raises(BudgetExceededError) as info:
            for _ in range(20):
                await first.complete_for_tenant(t, MSG, max_tokens=20, key_quota=a)
                await first.usage_tracker.flush()  # type: ignore[union-attr]
                served += 1
        assert (info.value.scope, info.value.limit) == ("key", "max_usd")
    assert served >= 2
    # The key's alerts: scope "key", the key's id as user_id (0.5, then 1.0 on refusal).
    assert {(e["scope"], e["user_id"], e["threshold"]) for e in events} == {
        ("key", a.key_id, 0.5),
        ("key", a.key_id, 1.0),
    }
    spent = await pg.fetchval(
        "SELECT sum(estimated_cost_usd) FROM model_usage_stats WHERE virtual_key_id = $1",
        a.key_id,
    )
    assert 0.05 - 0.027 <= spent <= 0.05 + 0.027  # within one reservation of the budget
    counted = await pg.fetchval(
        "SELECT sum(cost_usd) FROM usage_spend_counters"
        " WHERE tenant_id = $1 AND subject = $2 AND grain = 'd'",
        t,
        f"k:{a.key_id}",
    )
    assert counted == spent
    async with _router(pg_dsn, sim) as second:
        with pytest.raises(BudgetExceededError):
            await second.complete_for_tenant(t, MSG, max_tokens=20, key_quota=a)
        result = await second.complete_for_tenant(t, MSG, max_tokens=20, key_quota=b)
        assert result.cost is not None and result.cost > 0
        await second.usage_tracker.flush()  # type: ignore[union-attr]
    rows = await _rows(pg, t)
    assert sum(1 for r in rows if r["virtual_key_id"] == b.key_id) == 1
    assert all(r["virtual_key_id"] in (a.key_id, b.key_id) for r in rows)


def test_key_quota_limits_are_validated() -> None:
    with pytest.raises(ValueError, match=r"key_quota\.limits\.max_usd"):
        KeyQuota("k", {"max_usd": "lots"}).parsed()
    with pytest.raises(ValueError, match="key_id"):
        KeyQuota("", {})
    assert KeyQuota(uuid.UUID(int=1), {}).key_id == str(uuid.UUID(int=1))
