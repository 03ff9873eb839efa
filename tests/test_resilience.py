"""Deadlines, Retry-After and per-key circuit breakers, over real HTTP."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg

from llm_gateway import (
    AllProvidersFailedError,
    DeadlineExceededError,
    TenantLLMRouter,
    provider_settings,
)
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import make_tenant

MSG = [{"role": "user", "content": "hi"}]


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
        t = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
        async with TenantLLMRouter(pg_dsn, providers=providers, attempt_timeout=1.0) as router:
            started = time.monotonic()
            try:
                await router.complete_for_tenant(t, MSG, timeout=3.0)
            except DeadlineExceededError as exc:
                error = exc
            elapsed = time.monotonic() - started
        assert elapsed < 3.5
        assert [a.error_class for a in error.attempts] == ["ProviderTimeoutError"] * 3
        assert sorted(a.provider for a in error.attempts) == ["groq", "llm7", "openrouter"]
    finally:
        for sim in sims:
            await sim.close()


async def test_retry_after_skips_the_key(pg_dsn: str, pg: asyncpg.Connection) -> None:
    async with SimulatedProvider(name="g", retry_after=5) as g, SimulatedProvider(name="l") as lsim:
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
            assert time.monotonic() - started < 1.0  # no sleeping on the 429
            assert [a.provider for a in second.attempts] == ["llm7"]
            explained = await router.explain(t)
        assert len(g.requests) == 1
        assert "rate limited" in explained["excluded"]["groq"]
        [state] = [h for h in router.health() if h["provider"] == "groq"]
        assert 4.0 < state["rate_limited_for_s"] <= 5.0


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
        # Once open, A's key is not tried again: at most the concurrent first wave reached it.
        assert g.keys_seen().count("revoked-key-of-a") <= 6
        assert "revoked-key-of-a" not in str(router.health())


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
            assert waited >= 0.3

            g.retry_after = 5  # does not fit in a 1 s deadline: fail at once, no sleep
            g.script("429")
            started = time.monotonic()
            try:
                await router.complete_for_tenant(t, MSG, timeout=1.0)
            except AllProvidersFailedError as exc:
                error = exc
            assert time.monotonic() - started < 0.5
            assert [a.outcome for a in error.attempts] == ["rate_limit"]
