"""Governance through time and failure: a one-minute budget resets, PostgreSQL goes away
(both ``quota_on_db_error`` policies), a process holding reservations is killed. Real
PostgreSQL, the simulator over loopback HTTP, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from llm_gateway import TenantLLMRouter, provider_settings
from llm_gateway.governance.errors import BudgetExceededError, QuotaExceededError
from llm_gateway.simulator import SimulatedProvider
from tests.tcp_proxy import TcpProxy

# The priced tenant of the four-process tests: one definition.
from tests.test_governance_router_processes import WORST, _tenant

ROOT = Path(__file__).resolve().parents[1]
MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedProvider]:
    async with SimulatedProvider(name="l") as provider:
        yield provider


def _router(dsn: str, sim: SimulatedProvider, **options: Any) -> TenantLLMRouter:
    settings = {"llm7": provider_settings("llm7", sim.base_url, api_key="sys-l")}
    return TenantLLMRouter(dsn, providers=settings, **options)


async def _eventually(check: Callable[[], Awaitable[bool]], within: float) -> bool:
    """Poll ``check`` every 0.2 s for up to ``within`` seconds (wide: the machine is loaded)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while loop.time() < end:
        if await check():
            return True
        await asyncio.sleep(0.2)
    return await check()


async def _spent(pg: asyncpg.Connection, tenant: uuid.UUID) -> float:
    value = await pg.fetchval(
        "SELECT coalesce(sum(estimated_cost_usd), 0) FROM model_usage_stats WHERE tenant_id = $1",
        tenant,
    )
    return float(value)


# --- a one-minute budget resets --------------------------------------------------------------


async def test_one_minute_budget_resets_at_the_next_minute(
    pg_dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider
) -> None:
    t = await _tenant(pg, budget={"max_usd": 2.5 * WORST, "period": "1m"})
    now = datetime.now(UTC)
    if now.second >= 40:
        # Spend and be refused within one minute: start at the top of the next one.
        start = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        await asyncio.sleep((start - now).total_seconds() + 0.5)
    async with _router(pg_dsn, sim) as router:
        served = 0
        with pytest.raises(BudgetExceededError) as info:
            for _ in range(20):
                await router.complete_for_tenant(t, MSG, max_tokens=20)
                served += 1
                await router.usage_tracker.flush()  # type: ignore[union-attr]
        refusal = info.value
        assert served >= 2
        minute = datetime.now(UTC).replace(second=0, microsecond=0)
        assert refusal.resets_at == minute + timedelta(minutes=1)
        assert (refusal.scope, refusal.limit) == ("tenant", "max_usd")
        # Wide bound: the next minute has started a whole second ago.
        wait = (refusal.resets_at - datetime.now(UTC)).total_seconds() + 1.0
        await asyncio.sleep(max(0.0, wait))
        result = await router.complete_for_tenant(t, MSG, max_tokens=20)
        assert result.provider == "llm7"
    assert len(sim.requests) == served + 1  # the refused request reached no provider


# --- PostgreSQL unreachable ------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_database_down_enforces_from_what_the_process_holds(
    policy: str, pg_dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider, tmp_path: Path
) -> None:
    """Cut from PostgreSQL: "open" serves past the process's share, "closed" refuses once it is
    spent; usage rows spool and count toward the budget once PostgreSQL is back."""
    t = await _tenant(pg, budget={"max_usd": 100.0}, limits={"requests_per_minute": 1000})
    async with TcpProxy(pg_dsn) as proxy:
        router = _router(proxy.dsn, sim, spool_dir=tmp_path / "spool", quota_on_db_error=policy)
        async with router:
            for _ in range(5):  # config cached, leases held
                await router.complete_for_tenant(t, MSG, max_tokens=20)
            await router.usage_tracker.flush()  # type: ignore[union-attr]
            governor = router._gate.governor
            rpm = next(lease for lease in governor._leases.values() if lease.spec.kind == "rate")
            share = rpm.room()  # requests this process may still admit from its rpm lease
            await proxy.cut()
            served = refused = 0
            for _ in range(int(share) + 20):
                try:
                    await router.complete_for_tenant(t, MSG, max_tokens=20)
                    served += 1
                except QuotaExceededError:
                    refused += 1
            if policy == "open":
                assert refused == 0 and served == int(share) + 20
                assert governor.opened >= 20  # served past the share, counted
            else:
                assert served <= share and refused >= 20
                assert governor.opened == 0
            assert proxy.refused > 0  # PostgreSQL really was out of reach
            assert any((tmp_path / "spool").iterdir())  # the rows went to the spool

            proxy.restore()

            async def replayed() -> bool:
                count = await pg.fetchval(
                    "SELECT count(*) FROM model_usage_stats"
                    " WHERE tenant_id = $1 AND status = 'success'",
                    t,
                )
                return bool(count == 5 + served)

            assert await _eventually(replayed, 90)
            spent = await _spent(pg, t)

            async def counted() -> bool:
                [budget] = [s for s in await router.quota_status(t) if s["limit"] == "max_usd"]
                return bool(abs(budget["used"] - spent) < 1e-9)

            assert await _eventually(counted, 30)  # the replayed rows count toward the budget
    refusals = await pg.fetchval(
        "SELECT count(*) FROM model_usage_stats WHERE tenant_id = $1 AND status = 'quota_exceeded'",
        t,
    )
    assert refusals == refused  # refusals while cut spooled too


# --- a process holding reservations is killed -------------------------------------------------


async def test_lease_of_a_killed_process_returns_after_its_ttl(
    pg_dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider, tmp_path: Path
) -> None:
    n = 10
    max_usd = n * WORST + WORST / 2  # room for n requests in flight, not n + 1
    t = await _tenant(pg, budget={"max_usd": max_usd})
    sim.latency_ms = 30_000  # the child's requests stay in flight until it is killed
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.governance_lease_holder",
        pg_dsn,
        sim.base_url,
        str(t),
        str(n),
        str(tmp_path / "spool"),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def all_in_flight() -> bool:
            return len(sim.requests) >= n or child.returncode is not None

        assert await _eventually(all_in_flight, 60)
        assert len(sim.requests) == n, await child.stderr.read()  # type: ignore[union-attr]
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()  # SIGKILL: no lease is given back
        await child.wait()
    sim.latency_ms = 0
    before = len(sim.requests)

    async with _router(pg_dsn, sim) as router:
        [budget] = await router.quota_status(t)
        assert budget["reserved"] >= n * WORST * 0.99  # the dead process's lease still counts
        assert budget["remaining"] < WORST
        results = await asyncio.gather(
            *(router.complete_for_tenant(t, MSG, max_tokens=20) for _ in range(n)),
            return_exceptions=True,
        )
        assert all(isinstance(r, BudgetExceededError) for r in results), results
        assert len(sim.requests) == before

        async def returned() -> bool:
            [status] = await router.quota_status(t)
            return bool(status["reserved"] < 1e-9)

        # TTL 10 s, then the next renewal no longer counts it (wide bound: a loaded machine).
        assert await _eventually(returned, 40)
        [budget] = await router.quota_status(t)
        assert budget["remaining"] == pytest.approx(max_usd)
        results = await asyncio.gather(
            *(router.complete_for_tenant(t, MSG, max_tokens=20) for _ in range(n)),
            return_exceptions=True,
        )
        assert [getattr(r, "provider", r) for r in results] == ["llm7"] * n


# --- concurrent requests far below every limit -------------------------------------------------


async def test_concurrent_requests_far_below_every_limit_are_all_admitted(
    pg_dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider
) -> None:
    """Requests waiting on a renewal that did not carry their needs wait for the one that does
    (found by bench/bench_governance.py: a user budget of $1M refused at $0.07)."""
    high = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "requests_per_day": 10**9}
    t = await _tenant(
        pg,
        budget={"max_usd": 1e6},
        limits=high,
        user_limits={"max_usd": 1e6, "period": "1d", **high},
        system_keys={"max_usd": 1e6, **high},
        rate_limits={"llm7": high},
    )
    gate = asyncio.Semaphore(16)
    async with _router(pg_dsn, sim) as router:

        async def one(i: int) -> object:
            async with gate:
                try:
                    return await router.complete_for_tenant(
                        t, MSG, max_tokens=20, user_id=f"user{i % 5}"
                    )
                except QuotaExceededError as exc:
                    return exc

        results = await asyncio.gather(*(one(i) for i in range(300)))
    refused = [r for r in results if isinstance(r, QuotaExceededError)]
    assert refused == [], refused[:3]
