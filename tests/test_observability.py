"""Logs (structured extras, one INFO line per failover and per breaker transition, nothing
above DEBUG for a success, never a key) and the cost of the extras when absent."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from llm_gateway import TenantLLMRouter, provider_settings
from llm_gateway.observability import LOG_FIELDS
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import make_tenant

MSG = [{"role": "user", "content": "hello"}]
KEYS = ("gsk-system-secret", "llm7-system-secret", "gsk-tenant-secret")


@pytest.fixture
async def sims() -> AsyncIterator[tuple[SimulatedProvider, SimulatedProvider]]:
    groq, llm7 = SimulatedProvider(name="groq"), SimulatedProvider(name="llm7")
    async with groq, llm7:
        yield groq, llm7


def providers(groq: SimulatedProvider, llm7: SimulatedProvider) -> dict[str, Any]:
    return {
        "groq": provider_settings("groq", groq.root_url, api_key=KEYS[0]),
        "llm7": provider_settings("llm7", llm7.base_url, api_key=KEYS[1]),
    }


def everything(records: list[logging.LogRecord]) -> str:
    """Message, arguments and every extra field of each record, as one string."""
    return repr([(r.getMessage(), r.args, vars(r)) for r in records])


async def test_logs_one_line_per_failover_and_none_per_success(
    pg_dsn: str,
    pg: asyncpg.Connection,
    sims: tuple[SimulatedProvider, SimulatedProvider],
    caplog: pytest.LogCaptureFixture,
) -> None:
    groq, llm7 = sims
    t = await make_tenant(
        pg,
        llm_tokens={"groq": KEYS[2]},
        inference_config={"preferred_provider": "groq", "fallback_order": ["llm7"]},
    )
    caplog.set_level(logging.DEBUG, logger="llm_gateway")
    async with TenantLLMRouter(pg_dsn, providers=providers(groq, llm7)) as router:
        await router.tenant_config(t)  # loaded (its plaintext-key warning) before we look
        caplog.clear()
        await router.complete_for_tenant(t, MSG)
        assert [r for r in caplog.records if r.levelno > logging.DEBUG] == []

        groq.script("500")
        result = await router.complete_for_tenant(t, MSG)
        loud = [r for r in caplog.records if r.levelno > logging.DEBUG]
        assert len(loud) == 1, [r.getMessage() for r in loud]
        [failover] = loud
        assert (failover.name, failover.levelno) == ("llm_gateway", logging.INFO)
        fields = {f: getattr(failover, f) for f in LOG_FIELDS}
        assert fields == {
            "request_id": str(result.request_id),
            "tenant": str(t),
            "provider": "groq",
            "attempt": 1,
            "outcome": "error",
        }
        assert failover.next == "llm7"  # type: ignore[attr-defined]
        # The failed attempt itself is a DEBUG line, with the same fields.
        debug = [
            r for r in caplog.records if r.levelno == logging.DEBUG and r.name == "llm_gateway"
        ]
        assert any(getattr(r, "request_id", None) == str(result.request_id) for r in debug)
        assert not any(k in everything(caplog.records) for k in KEYS)


async def test_breaker_transitions_are_logged_once_each(
    pg_dsn: str,
    pg: asyncpg.Connection,
    sims: tuple[SimulatedProvider, SimulatedProvider],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from llm_gateway.health import HealthRegistry

    groq, llm7 = sims
    t = await make_tenant(
        pg,
        llm_tokens={"groq": KEYS[2]},
        inference_config={"preferred_provider": "groq", "fallback_order": ["llm7"]},
    )
    now = [1000.0]
    health = HealthRegistry(failure_threshold=2, cooldown=30.0, clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="llm_gateway")
    async with TenantLLMRouter(pg_dsn, providers=providers(groq, llm7), health=health) as r:
        fp = r.key_fingerprint(KEYS[2])
        await r.tenant_config(t)
        caplog.clear()
        groq.script("500", "500")
        await r.complete_for_tenant(t, MSG)
        await r.complete_for_tenant(t, MSG)  # the second failure opens the breaker
        await r.complete_for_tenant(t, MSG)  # groq skipped: llm7 only, no failover
        now[0] += 31  # cooldown over: the next request is groq's probe, which succeeds
        result = await r.complete_for_tenant(t, MSG)
    assert result.provider == "groq"
    breaker = [x for x in caplog.records if x.name == "llm_gateway.health"]
    assert [(x.breaker_from, x.breaker_state) for x in breaker] == [  # type: ignore[attr-defined]
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert all(x.levelno == logging.INFO and x.key_fp == fp for x in breaker)  # type: ignore[attr-defined]
    failovers = [x for x in caplog.records if x.getMessage().startswith("failover")]
    assert len(failovers) == 2
    loud = [x for x in caplog.records if x.levelno > logging.DEBUG]
    assert len(loud) == 5  # three transitions, two failovers: nothing per success
    assert not any(k in everything(caplog.records) for k in KEYS)


async def test_a_failed_request_logs_one_line(
    pg_dsn: str,
    pg: asyncpg.Connection,
    sims: tuple[SimulatedProvider, SimulatedProvider],
    caplog: pytest.LogCaptureFixture,
) -> None:
    groq, _llm7 = sims
    t = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
    caplog.set_level(logging.DEBUG, logger="llm_gateway")
    async with TenantLLMRouter(
        pg_dsn, providers={"groq": provider_settings("groq", groq.root_url, api_key=KEYS[0])}
    ) as router:
        caplog.clear()
        groq.script("400")
        with pytest.raises(Exception, match="HTTP 400"):
            await router.complete_for_tenant(t, MSG)
    loud = [r for r in caplog.records if r.levelno > logging.DEBUG]
    assert [r.getMessage().split(":")[0] for r in loud] == ["request failed"]
    assert (loud[0].provider, loud[0].outcome, loud[0].attempt) == ("groq", "error", 1)  # type: ignore[attr-defined]


def test_import_does_not_load_the_extras() -> None:
    code = textwrap.dedent(
        """
        import sys
        import llm_gateway
        from llm_gateway import TenantLLMRouter
        from llm_gateway.router import TenantLLMRouter as R
        router = R("postgresql://u@127.0.0.1:1/x", providers={})
        assert router._observer is None
        loaded = sorted(m for m in sys.modules
                        if m.split(".")[0] in ("prometheus_client", "opentelemetry"))
        print(loaded)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
