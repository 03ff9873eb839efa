"""Four router processes share a tenant's budget, rpm and alerts through PostgreSQL."""

from __future__ import annotations

import asyncio
import multiprocessing
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from llm_gateway.simulator import SimulatedProvider
from tests import governance_router_worker
from tests.conftest import make_tenant

PROCESSES = 4
PRICEY = "pricey-model"
# A request reserves (about 4 input + 20 output tokens) at $1,000 per million: $0.024 at most.
WORST_TOKENS = len("hello there") // 4 + 4 + 1 + 20
WORST = WORST_TOKENS * 1000 / 1e6


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


def _spawn(
    dsn: str,
    sim: SimulatedProvider,
    tenant: uuid.UUID,
    n: int,
    tmp: Path,
    options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    args = [
        (dsn, sim.base_url, str(tenant), n, seed, str(tmp / f"spool{seed}"), options or {})
        for seed in range(PROCESSES)
    ]
    with ctx.Pool(PROCESSES) as pool:
        return pool.starmap(governance_router_worker.run, args)


async def _spent(pg: asyncpg.Connection, tenant: uuid.UUID) -> float:
    return float(
        await pg.fetchval(
            "SELECT coalesce(sum(estimated_cost_usd), 0) FROM model_usage_stats"
            " WHERE tenant_id = $1",
            tenant,
        )
    )


async def test_budget_across_four_router_processes(
    pg_dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider, tmp_path: Path
) -> None:
    """400 requests at once: spend stays within one worst case per process of max_usd."""
    max_usd = 1.0
    t = await _tenant(pg, budget={"max_usd": max_usd})
    # In a thread: the simulator serves from this process's event loop meanwhile.
    results = await asyncio.to_thread(_spawn, pg_dsn, sim, t, 100, tmp_path)
    served = sum(len(r["served"]) for r in results)
    refused = sum(r["refused"] for r in results)
    assert served + refused == 400 and refused > 0
    assert await _spent(pg, t) <= max_usd + PROCESSES * WORST
    assert len(sim.requests) == served  # a refused request reached no provider
    refusals = await pg.fetchval(
        "SELECT count(*) FROM model_usage_stats WHERE tenant_id = $1 AND status = 'quota_exceeded'",
        t,
    )
    assert refusals == refused


async def test_budget_is_not_stranded_in_idle_leases(
    pg_dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider, tmp_path: Path
) -> None:
    """Steady demand beyond the budget: it is spent to within 5 % (or the reservations of
    the last requests in flight), not left in other processes' leases; each alert fires once."""
    max_usd = 1.0
    t = await _tenant(pg, budget={"max_usd": max_usd, "alert_at": [0.5, 0.8, 1.0]})
    sim.latency_ms = 20
    options = {"concurrency": 4}
    results = await asyncio.to_thread(_spawn, pg_dsn, sim, t, 100, tmp_path, options)
    assert sum(r["refused"] for r in results) > 0
    spent = await _spent(pg, t)
    assert max_usd - max(0.05 * max_usd, PROCESSES * WORST) <= spent <= max_usd + 4 * WORST
    events = await pg.fetch(
        "SELECT threshold FROM budget_events WHERE tenant_id = $1 ORDER BY threshold", t
    )
    assert [e["threshold"] for e in events] == [0.5, 0.8, 1.0]
    fired = sorted(e["threshold"] for r in results for e in r["events"])
    assert fired == [0.5, 0.8, 1.0]  # each callback once, in whichever process won


async def test_rpm_across_four_router_processes(
    pg_dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider, tmp_path: Path
) -> None:
    rpm = 60
    t = await _tenant(pg, limits={"requests_per_minute": rpm})
    # In a thread: the simulator serves from this process's event loop meanwhile.
    results = await asyncio.to_thread(_spawn, pg_dsn, sim, t, 100, tmp_path)
    times = sorted(x for r in results for x in r["served"])
    assert times[-1] - times[0] < 60  # one window holds them all
    assert len(times) <= rpm + PROCESSES
    assert len(times) >= 0.95 * rpm
    statements = sum(r["statements"] for r in results)
    assert statements < 400  # leases, not a statement per request


async def test_tpm_across_four_router_processes(
    pg_dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider, tmp_path: Path
) -> None:
    """Tokens admitted in one 60 s window stay within tokens_per_minute plus one request's
    reservation per process (a request reserves its input estimate + max_tokens; it gives back
    what it did not use when it ends, so the served rows' tokens are what the limit counts)."""
    tpm = 1500
    t = await _tenant(pg, limits={"tokens_per_minute": tpm})
    results = await asyncio.to_thread(_spawn, pg_dsn, sim, t, 100, tmp_path)
    times = sorted(x for r in results for x in r["served"])
    assert times[-1] - times[0] < 60  # one window holds them all
    tokens = await pg.fetchval(
        "SELECT sum(input_tokens + output_tokens) FROM model_usage_stats"
        " WHERE tenant_id = $1 AND status = 'success'",
        t,
    )
    assert len(times) * 5 < tokens  # the rows carry real token counts
    assert 0.5 * tpm <= tokens <= tpm + PROCESSES * WORST_TOKENS
    assert sum(r["refused"] for r in results) > 0
