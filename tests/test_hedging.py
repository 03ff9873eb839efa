"""Hedged requests (issue "Routing, round two", item 3): after a delay the next provider is
started as well; the first good answer wins, the other attempt is cancelled and its row says
so (status ``cancelled``, ``metadata.hedge``). Real PostgreSQL, simulators over loopback HTTP.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

from llm_gateway import InvalidTenantConfigError, TenantLLMRouter
from llm_gateway.simulator import Behaviour, LatencyDistribution
from tests.two_providers import prefer_groq, rows, settings

MSG = [{"role": "user", "content": "hello"}]
SLOW = Behaviour("ok", latency_ms=8000)  # far beyond every hedge delay used here


async def test_slow_first_provider_is_hedged_and_cancelled(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    t = await prefer_groq(pg)
    a.script(Behaviour("ok", latency_ms=2000))
    async with TenantLLMRouter(pg_dsn, providers=settings(a, b), hedge={"after_ms": 300}) as router:
        result = await router.complete_for_tenant(t, MSG, timeout=30)
        health = {h["provider"]: h for h in router.health()}
    assert result.provider == "llm7"
    assert result.content == "[b] hello"
    assert len(a.requests) == 1 and len(b.requests) == 1
    assert [(x.provider, x.outcome) for x in result.attempts] == [
        ("groq", "cancelled"),
        ("llm7", "success"),
    ]
    found = {r["provider"]: r for r in await rows(pg, t, by_attempt=True)}
    assert found["groq"]["status"] == "cancelled"
    assert found["groq"]["metadata"]["hedge"] is True
    assert "hedge" in found["groq"]["error_message"]
    assert found["llm7"]["status"] == "success" and found["llm7"]["metadata"]["hedge"] is True
    # The loser was cancelled by us, not failed by the provider: its health is untouched.
    assert health["groq"]["failures"] == 0 and health["groq"]["state"] == "closed"
    # Its connection was closed, not kept: once the slow provider has written its late answer
    # into it, the simulator sees the close (a pooled keep-alive connection would stay open).
    for _ in range(200):
        if a.open_connections == 0:
            break
        await asyncio.sleep(0.05)
    assert a.open_connections == 0


async def test_no_hedge_when_the_first_answers_in_time(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    t = await prefer_groq(pg)
    async with TenantLLMRouter(
        pg_dsn, providers=settings(a, b), hedge={"after_ms": 5000}
    ) as router:
        results = [await router.complete_for_tenant(t, MSG) for _ in range(3)]
    assert {r.provider for r in results} == {"groq"}
    assert b.requests == []
    found = await rows(pg, t, by_attempt=True)
    assert [r["status"] for r in found] == ["success"] * 3
    assert all("hedge" not in r["metadata"] for r in found)


async def test_tenant_hedge_wins_over_the_router(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    on = await prefer_groq(pg, hedge={"after_ms": 300})
    off = await prefer_groq(pg, hedge=False)
    async with TenantLLMRouter(pg_dsn, providers=settings(a, b)) as router:
        a.script(SLOW)
        assert (await router.complete_for_tenant(on, MSG, timeout=30)).provider == "llm7"
    async with TenantLLMRouter(pg_dsn, providers=settings(a, b), hedge={"after_ms": 300}) as router:
        a.script(Behaviour("ok", latency_ms=1500))
        result = await router.complete_for_tenant(off, MSG, timeout=30)
    assert result.provider == "groq" and len(result.attempts) == 1
    assert len(b.requests) == 1  # only the hedge of the first tenant


async def test_p95_hedge_uses_the_latency_sketch(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    t = await prefer_groq(pg, hedge={"after": "p95"})
    async with TenantLLMRouter(pg_dsn, providers=settings(a, b)) as router:
        # Cold: no basis for a p95, so no hedge; the slow answer is waited for.
        a.script(Behaviour("ok", latency_ms=1500))
        cold = await router.complete_for_tenant(t, MSG, timeout=30)
        assert cold.provider == "groq" and b.requests == []
        # Warm with millisecond answers: a slow one is hedged at once.
        await asyncio.gather(*(router.complete_for_tenant(t, MSG) for _ in range(20)))
        assert b.requests == []
        a.script(SLOW)
        warm = await router.complete_for_tenant(t, MSG, timeout=30)
    assert warm.provider == "llm7"
    assert [x.outcome for x in warm.attempts] == ["cancelled", "success"]


async def test_hedge_that_fails_leaves_the_first_to_answer(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    t = await prefer_groq(pg)
    a.script(Behaviour("ok", latency_ms=1500))
    b.script("503")
    async with TenantLLMRouter(pg_dsn, providers=settings(a, b), hedge={"after_ms": 200}) as router:
        result = await router.complete_for_tenant(t, MSG, timeout=30)
    assert result.provider == "groq"
    assert [(x.provider, x.outcome) for x in result.attempts] == [
        ("llm7", "error"),
        ("groq", "success"),
    ]
    assert all(r["metadata"]["hedge"] is True for r in await rows(pg, t, by_attempt=True))


async def test_streams_are_not_hedged(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    t = await prefer_groq(pg, hedge={"after_ms": 200})
    a.script(Behaviour("ok", latency_ms=1500))
    async with TenantLLMRouter(pg_dsn, providers=settings(a, b)) as router:
        async with await router.stream_for_tenant(t, MSG, timeout=30) as stream:
            text = "".join([c.content async for c in stream])
    assert text == "[a] hello"
    assert b.requests == []


async def test_invalid_hedge_settings_are_refused(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    with pytest.raises(ValueError, match="after_ms"):
        TenantLLMRouter(pg_dsn, providers=settings(a, b), hedge={"after_ms": -1})
    with pytest.raises(ValueError, match="exactly one"):
        TenantLLMRouter(pg_dsn, providers=settings(a, b), hedge={})
    t = await prefer_groq(pg, hedge={"after": "p200"})
    async with TenantLLMRouter(pg_dsn, providers=settings(a, b)) as router:
        with pytest.raises(InvalidTenantConfigError) as info:
            await router.complete_for_tenant(t, MSG)
    assert info.value.field == "inference_config.hedge.after"


async def test_caller_cancelled_during_a_race_writes_both_rows(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    t = await prefer_groq(pg)
    a.script(SLOW)
    b.script(SLOW)
    async with TenantLLMRouter(pg_dsn, providers=settings(a, b), hedge={"after_ms": 200}) as router:
        task = asyncio.create_task(router.complete_for_tenant(t, MSG, timeout=30))
        for _ in range(500):
            if b.requests:  # the hedge has started
                break
            await asyncio.sleep(0.02)
        assert b.requests
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    found = await rows(pg, t, by_attempt=True)
    assert sorted((r["provider"], r["status"]) for r in found) == [
        ("groq", "cancelled"),
        ("llm7", "cancelled"),
    ]
    assert all(r["metadata"]["hedge"] is True for r in found)
    # The caller cancelled: neither row says another attempt won.
    assert {r["error_message"] for r in found} == {"CancelledError"}


def test_latency_distribution_has_the_asked_tail() -> None:
    dist = LatencyDistribution(40, sigma=0.2, tail_rate=0.05, tail_ms=2000)
    rng = random.Random(7)
    draws = sorted(dist.sample(rng) for _ in range(4000))
    slow = sum(d > 500 for d in draws) / len(draws)
    assert 0.03 < slow < 0.07
    assert 30 < draws[len(draws) // 2] < 55  # the median is the body's
    assert LatencyDistribution(25).sample(rng) == 25
    with pytest.raises(ValueError):
        LatencyDistribution(10, tail_rate=1.5)
