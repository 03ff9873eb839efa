"""Deadlines, Retry-After and per-key circuit breakers, over real HTTP."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import asyncpg
import pytest

from llm_gateway import (
    AllProvidersFailedError,
    ConfigUnavailableError,
    DeadlineExceededError,
    HealthRegistry,
    TenantLLMRouter,
    provider_settings,
)
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import _create, _drop, _dsn_for, make_tenant

MSG = [{"role": "user", "content": "hi"}]


async def eventually(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait until ``predicate()`` holds (a wide bound: it returns as soon as it does)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class FakeClock:
    """A monotonic clock the test moves by hand (breaker cooldowns without sleeping)."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_three_hanging_providers_end_inside_the_deadline(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    sims = [SimulatedProvider(name=n, fail_with="hang") for n in ("a", "b", "c")]
    for sim in sims:
        await sim.start()
    try:
        providers = {
            "groq": provider_settings("groq", sims[0].root_url, api_key="k1"),
            "openrouter": provider_settings("openrouter", sims[1].base_url, api_key="k2"),
            "llm7": provider_settings("llm7", sims[2].base_url, api_key="k3"),
        }
        t = await make_tenant(pg, inference_config={"fallback_order": ["groq", "openrouter"]})
        # Each attempt may take 3 s, the request 4 s: the second attempt is cut at the
        # deadline and the third never starts (without the deadline: 9 s, three attempts).
        async with TenantLLMRouter(pg_dsn, providers=providers, attempt_timeout=3.0) as router:
            started = time.monotonic()
            try:
                await router.complete_for_tenant(t, MSG, timeout=4.0)
            except DeadlineExceededError as exc:
                error = exc
            elapsed = time.monotonic() - started
        assert elapsed < 7.5  # wide: the machine may be loaded
        assert [a.error_class for a in error.attempts] == ["ProviderTimeoutError"] * 2
        assert [a.provider for a in error.attempts] == ["groq", "openrouter"]
        assert [len(sim.requests) for sim in sims] == [1, 1, 0]
    finally:
        for sim in sims:
            await sim.close()


async def test_retry_after_skips_the_key(pg_dsn: str, pg: asyncpg.Connection) -> None:
    async with (
        SimulatedProvider(name="g", retry_after=30) as g,
        SimulatedProvider(name="l") as lsim,
    ):
        providers = {
            "groq": provider_settings("groq", g.root_url, api_key="sys-g"),
            "llm7": provider_settings("llm7", lsim.base_url, api_key="sys-l"),
        }
        t = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
        g.script("429")
        async with TenantLLMRouter(pg_dsn, providers=providers) as router:
            first = await router.complete_for_tenant(t, MSG)
            assert [a.provider for a in first.attempts] == ["groq", "llm7"]
            started = time.monotonic()
            second = await router.complete_for_tenant(t, MSG)
            assert time.monotonic() - started < 10.0  # no sleeping out the 30 s Retry-After
            assert [a.provider for a in second.attempts] == ["llm7"]
            explained = await router.explain(t)
        assert len(g.requests) == 1
        assert "rate limited" in explained["excluded"]["groq"]
        [state] = [h for h in router.health() if h["provider"] == "groq"]
        assert 20.0 < state["rate_limited_for_s"] <= 30.0


async def test_revoked_tenant_key_affects_only_that_tenant(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    async with SimulatedProvider(name="g") as g, SimulatedProvider(name="l") as lsim:
        g.key_behaviours["revoked-key-of-a"] = "401"
        providers = {
            "groq": provider_settings("groq", g.root_url, api_key="system-groq"),
            "llm7": provider_settings("llm7", lsim.base_url, api_key="system-llm7"),
        }
        config = {"preferred_provider": "groq"}
        tenant_a = await make_tenant(
            pg, llm_tokens={"groq": "revoked-key-of-a"}, inference_config=config
        )
        others = [
            await make_tenant(pg, llm_tokens={"groq": f"good-key-{i}"}, inference_config=config)
            for i in range(10)
        ]
        keyless = [await make_tenant(pg, inference_config=config) for _ in range(9)]
        async with TenantLLMRouter(pg_dsn, providers=providers) as router:
            jobs = [(t, n) for t in [tenant_a, *others, *keyless] for n in range(6)]
            results = await asyncio.gather(*(router.complete_for_tenant(t, MSG) for t, _ in jobs))
            health = {h["key_fingerprint"]: h for h in router.health() if h["provider"] == "groq"}
            # Once open, A's key is not tried again: only the concurrent first wave reached it.
            first_wave = g.keys_seen().count("revoked-key-of-a")
            later = [await router.complete_for_tenant(tenant_a, MSG) for _ in range(10)]
            assert g.keys_seen().count("revoked-key-of-a") == first_wave
            assert [[a.provider for a in r.attempts] for r in later] == [["llm7"]] * 10
        by_tenant: dict[uuid.UUID, set[str]] = {}
        for (t, _), r in zip(jobs, results, strict=True):
            by_tenant.setdefault(t, set()).add(r.provider)
        assert by_tenant[tenant_a] == {"llm7"}
        assert all(by_tenant[t] == {"groq"} for t in [*others, *keyless])
        revoked = router.key_fingerprint("revoked-key-of-a")
        system = router.key_fingerprint("system-groq")
        assert (
            health[revoked]["state"] == "open"
            and health[revoked]["last_error"] == "AuthenticationError"
        )
        assert health[system]["state"] == "closed" and health[system]["failures"] == 0
        assert 1 <= first_wave <= 6
        assert "revoked-key-of-a" not in str(router.health())


async def test_open_breaker_keeps_the_key_from_being_tried(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    """5 failures open the breaker; no request reaches the key until the 30 s cooldown ends,
    then exactly one probe does: its failure re-opens the breaker, its success closes it."""
    clock = FakeClock()
    health = HealthRegistry(clock=clock)  # failure_threshold=5, cooldown=30 s
    async with (
        SimulatedProvider(name="g", fail_with="500") as g,
        SimulatedProvider(name="l") as lsim,
    ):
        providers = {
            "groq": provider_settings("groq", g.root_url, api_key="sys-g"),
            "llm7": provider_settings("llm7", lsim.base_url, api_key="sys-l"),
        }
        t = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
        async with TenantLLMRouter(pg_dsn, providers=providers, health=health) as router:

            async def served_by(n: int) -> list[list[str]]:
                results = [await router.complete_for_tenant(t, MSG) for _ in range(n)]
                assert {r.provider for r in results} <= {"groq", "llm7"}
                return [[a.provider for a in r.attempts] for r in results]

            # Every request succeeds by failing over; groq is tried until the breaker opens.
            assert await served_by(12) == [["groq", "llm7"]] * 5 + [["llm7"]] * 7
            assert len(g.requests) == 5
            [state] = [h for h in router.health() if h["provider"] == "groq"]
            assert state["state"] == "open" and state["last_error"] == "ServerError"

            clock.now += 29.0  # still inside the cooldown
            assert await served_by(3) == [["llm7"]] * 3
            assert len(g.requests) == 5

            clock.now += 1.5  # cooldown over: one probe, which fails and re-opens the breaker
            assert await served_by(4) == [["groq", "llm7"]] + [["llm7"]] * 3
            assert len(g.requests) == 6

            g.fail_with = None  # the provider recovers
            clock.now += 30.5  # the next probe succeeds and closes the breaker
            assert await served_by(3) == [["groq"]] * 3
            assert len(g.requests) == 9
        assert len(lsim.requests) == 5 + 7 + 3 + 4


async def test_last_provider_waits_out_a_short_retry_after(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    async with SimulatedProvider(name="g", retry_after=0.3) as g:
        providers = {"groq": provider_settings("groq", g.root_url, api_key="sys-g")}
        t = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
        async with TenantLLMRouter(pg_dsn, providers=providers) as router:
            g.script("429")
            started = time.monotonic()
            result = await router.complete_for_tenant(t, MSG)
            waited = time.monotonic() - started
            assert [a.outcome for a in result.attempts] == ["rate_limit", "success"]
            assert waited >= 0.3  # a lower bound: load only makes it longer

            g.retry_after = 30  # does not fit in a 20 s deadline: fail at once, no sleep
            g.script("429")
            started = time.monotonic()
            try:
                await router.complete_for_tenant(t, MSG, timeout=20.0)
            except AllProvidersFailedError as exc:
                error = exc
            assert time.monotonic() - started < 10.0
            assert [a.outcome for a in error.attempts] == ["rate_limit"]


async def test_cancelled_call_writes_a_cancelled_row(pg_dsn: str, pg: asyncpg.Connection) -> None:
    """The caller gives up on a non-streamed call: one ``cancelled`` row, and the key's
    health is untouched (a cancellation says nothing about the provider)."""
    async with SimulatedProvider(name="g", latency_ms=60_000) as g:
        providers = {"groq": provider_settings("groq", g.root_url, api_key="sys-g")}
        t = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
        async with TenantLLMRouter(pg_dsn, providers=providers) as router:
            task = asyncio.create_task(
                router.complete_for_tenant(t, MSG, endpoint="/api/cancel", user_id="u-9")
            )
            await eventually(lambda: len(g.requests) == 1)  # the attempt reached the provider
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            [state] = [h for h in router.health() if h["provider"] == "groq"]
            assert (state["state"], state["failures"], state["last_error"]) == ("closed", 0, None)
            g.latency_ms = 0
            assert (await router.complete_for_tenant(t, MSG)).provider == "groq"
        # close() drained the queue: both rows are in PostgreSQL now.
        rows = await pg.fetch(
            "SELECT status, provider, endpoint, user_id, attempt, key_source, input_tokens"
            " FROM model_usage_stats WHERE tenant_id = $1 AND endpoint = '/api/cancel'",
            t,
        )
    assert [dict(r) for r in rows] == [
        {
            "status": "cancelled",
            "provider": "groq",
            "endpoint": "/api/cancel",
            "user_id": "u-9",
            "attempt": 1,
            "key_source": "system",
            "input_tokens": None,
        }
    ]


async def test_stale_if_error_zero_fails_once_the_ttl_expired(pg_dsn: str) -> None:
    """With ``stale_if_error=0`` a database outage is not hidden: once the cached config's
    TTL has passed, the request fails with ConfigUnavailableError. The default serves the
    last known config instead (shown side by side)."""
    name = f"llmgw_test_stale_{uuid.uuid4().hex[:8]}"
    await _create(name)
    dsn = _dsn_for(name)
    async with SimulatedProvider(name="g") as g:
        providers = {"groq": provider_settings("groq", g.root_url, api_key="sys-g")}
        strict = TenantLLMRouter(
            dsn, providers=providers, record_usage=False, cache_ttl=0.2, stale_if_error=0
        )
        lenient = TenantLLMRouter(dsn, providers=providers, record_usage=False, cache_ttl=0.2)
        try:
            conn = await asyncpg.connect(dsn)
            t = await make_tenant(conn, inference_config={"preferred_provider": "groq"})
            await conn.close()
            for router in (strict, lenient):
                assert (await router.complete_for_tenant(t, MSG)).provider == "groq"
            await _drop(name)  # the config database is gone; its connections are terminated
            await asyncio.sleep(0.5)  # past the 0.2 s TTL (load only makes the wait longer)
            with pytest.raises(ConfigUnavailableError) as info:
                await strict.complete_for_tenant(t, MSG)
            assert str(t) in str(info.value)
            assert (await lenient.complete_for_tenant(t, MSG)).provider == "groq"
            assert len(g.requests) == 3  # the strict router's failed request reached no one
        finally:
            await strict.close()
            await lenient.close()
            await _drop(name)
