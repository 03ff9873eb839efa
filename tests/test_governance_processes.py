"""Four real processes share one budget and one rpm through leases in PostgreSQL."""

from __future__ import annotations

import multiprocessing
import uuid
from typing import Any

import asyncpg

from tests import governance_worker

PROCESSES = 4
WORST = 0.003  # one request's worst-case cost in the worker


def _spawn(dsn: str, tenant: uuid.UUID, raw: dict[str, Any], n: int) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(PROCESSES) as pool:
        return pool.starmap(
            governance_worker.run, [(dsn, str(tenant), raw, n, seed) for seed in range(PROCESSES)]
        )


async def test_budget_across_four_processes(pg_dsn: str, pg: asyncpg.Connection) -> None:
    tenant = uuid.uuid4()
    max_usd = 0.2  # about 100 requests of the 400
    results = _spawn(pg_dsn, tenant, {"budget": {"max_usd": max_usd}}, 100)
    spent = float(
        await pg.fetchval(
            "SELECT coalesce(sum(estimated_cost_usd), 0) FROM model_usage_stats"
            " WHERE tenant_id = $1",
            tenant,
        )
    )
    admitted = sum(len(r["admitted"]) for r in results)
    assert admitted + sum(r["refused"] for r in results) == 4 * 100
    assert spent <= max_usd + PROCESSES * WORST
    # Nothing stranded: refusals began only when less than 5 % (or one request) was left.
    assert spent >= max_usd - max(0.05 * max_usd, WORST) - PROCESSES * WORST
    assert (
        await pg.fetchval(
            "SELECT count(*) FROM quota_leases WHERE limit_key LIKE $1", f"t:{tenant}%"
        )
        == 0
    )


async def test_rpm_across_four_processes(pg_dsn: str) -> None:
    tenant = uuid.uuid4()
    rpm = 60
    results = _spawn(pg_dsn, tenant, {"limits": {"requests_per_minute": rpm}}, 100)
    times = sorted(t for r in results for t in r["admitted"])
    # Every admission happened within a few seconds: all of them are in one 60 s window.
    assert times[-1] - times[0] < 60
    assert len(times) <= rpm + PROCESSES
    assert len(times) >= rpm * 0.95
