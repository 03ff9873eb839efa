"""Prometheus metrics: a known sequence of requests against simulated providers, scraped in
the text format and checked number by number; the Grafana dashboard uses only these names."""

from __future__ import annotations

import gc
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llm_gateway import TenantLLMRouter, provider_settings
from llm_gateway.governance.errors import QuotaExceededError
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import make_tenant

MSG = [{"role": "user", "content": "hello"}]
GROQ_MODEL = "llama-3.3-70b-versatile"
LLM7_MODEL = "gpt-4o-mini"
DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"


@pytest.fixture
async def sims() -> AsyncIterator[tuple[SimulatedProvider, SimulatedProvider]]:
    # retry_after=0: a 429 does not keep groq out of the next request's chain.
    groq, llm7 = SimulatedProvider(name="groq", retry_after=0), SimulatedProvider(name="llm7")
    async with groq, llm7:
        yield groq, llm7


def providers(groq: SimulatedProvider, llm7: SimulatedProvider) -> dict[str, Any]:
    return {
        "groq": provider_settings("groq", groq.root_url, api_key="gsk-system-secret"),
        "llm7": provider_settings("llm7", llm7.base_url, api_key="llm7-system-secret"),
    }


def scrape(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)], parsed from the Prometheus text format."""
    text = generate_latest(registry).decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    """The one sample of ``name`` with exactly ``labels`` (0 when there is none)."""
    found = [v for lab, v in samples.get(name, []) if lab == labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def families(registry: CollectorRegistry) -> set[str]:
    return {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}


async def test_metrics_count_a_known_sequence(
    pg_dsn: str, pg: asyncpg.Connection, sims: tuple[SimulatedProvider, SimulatedProvider]
) -> None:
    groq, llm7 = sims
    chain = {"preferred_provider": "groq", "fallback_order": ["llm7"]}
    a = await make_tenant(pg, inference_config=chain)
    capped = await make_tenant(
        pg, inference_config={**chain, "user_limits": {"requests_per_minute": 1}}
    )
    revoked = await make_tenant(
        pg, llm_tokens={"groq": "gsk-revoked-secret"}, inference_config=chain
    )
    groq.key_behaviours["gsk-revoked-secret"] = "401"
    registry = CollectorRegistry()
    async with TenantLLMRouter(pg_dsn, providers=providers(groq, llm7), metrics=registry) as router:
        before = families(registry)
        # Registered from the start, before any request and any refusal.
        assert {"llm_gateway_quota_refusals", "llm_gateway_requests"} <= before
        assert scrape(registry).get("llm_gateway_quota_refusals_total") is None

        results = [await router.complete_for_tenant(a, MSG)]  # groq answers
        groq.script("500")
        results.append(await router.complete_for_tenant(a, MSG))  # groq 500 -> llm7
        groq.script("429")
        results.append(await router.complete_for_tenant(a, MSG))  # groq 429 -> llm7
        async with await router.stream_for_tenant(a, MSG) as stream:
            async for _ in stream:
                pass
        assert stream.result is not None
        results.append(stream.result)
        results.append(await router.complete_for_tenant(capped, MSG, user_id="alice"))
        with pytest.raises(QuotaExceededError):
            await router.complete_for_tenant(capped, MSG, user_id="alice")
        results.append(await router.complete_for_tenant(revoked, MSG))  # 401 -> llm7
        tracker = router.usage_tracker
        assert tracker is not None
        await tracker.flush(timeout=30)
        s = scrape(registry)
        revoked_fp = router.key_fingerprint("gsk-revoked-secret")
        system_fp = router.key_fingerprint("gsk-system-secret")

    assert [r.provider for r in results] == ["groq", "llm7", "llm7", "groq", "groq", "llm7"]
    assert value(s, "llm_gateway_requests_total", outcome="success") == 6
    assert value(s, "llm_gateway_requests_total", outcome="quota_exceeded") == 1
    assert value(s, "llm_gateway_request_duration_seconds_count") == 7

    def attempts(provider: str, model: str, outcome: str, key_source: str = "system") -> float:
        return value(
            s,
            "llm_gateway_attempts_total",
            provider=provider,
            model=model,
            outcome=outcome,
            key_source=key_source,
        )

    assert attempts("groq", GROQ_MODEL, "success") == 3
    assert attempts("groq", GROQ_MODEL, "error") == 1
    assert attempts("groq", GROQ_MODEL, "rate_limit") == 1
    assert attempts("groq", GROQ_MODEL, "auth_error", "tenant") == 1
    assert attempts("llm7", LLM7_MODEL, "success") == 3
    assert sum(v for _, v in s["llm_gateway_attempts_total"]) == 9  # no row of a refusal
    assert value(s, "llm_gateway_failovers_total", provider="groq", reason="error") == 1
    assert value(s, "llm_gateway_failovers_total", provider="groq", reason="rate_limit") == 1
    assert value(s, "llm_gateway_failovers_total", provider="groq", reason="auth_error") == 1
    assert value(s, "llm_gateway_attempt_duration_seconds_count", provider="groq") == 6
    assert value(s, "llm_gateway_attempt_duration_seconds_count", provider="llm7") == 3
    assert value(s, "llm_gateway_time_to_first_token_seconds_count", provider="groq") == 1

    for provider, model in (("groq", GROQ_MODEL), ("llm7", LLM7_MODEL)):
        served = [r for r in results if r.provider == provider]
        for direction, field in (("input", "tokens_input"), ("output", "tokens_output")):
            expected = sum(getattr(r, field) or 0 for r in served)
            assert expected > 0
            got = value(
                s, "llm_gateway_tokens_total", provider=provider, model=model, direction=direction
            )
            assert got == expected, (provider, direction)
        cost = sum(float(r.cost or 0) for r in served)
        assert cost > 0
        assert value(
            s, "llm_gateway_cost_usd_total", provider=provider, model=model
        ) == pytest.approx(cost)

    assert value(s, "llm_gateway_breaker_state", provider="groq", key_fp=revoked_fp) == 2
    assert value(s, "llm_gateway_breaker_state", provider="groq", key_fp=system_fp) == 0
    # Tenants a, capped and revoked loaded once each; their 4 + 1 + 0 later requests hit.
    assert value(s, "llm_gateway_config_cache_total", event="miss") == 3
    assert value(s, "llm_gateway_config_cache_total", event="hit") == 4
    assert value(s, "llm_gateway_config_cache_total", event="stale") == 0
    # Every attempt is a row, and so is the refusal.
    assert value(s, "llm_gateway_usage_written_rows_total") == 10
    assert value(s, "llm_gateway_usage_queue_rows") == 0
    assert value(s, "llm_gateway_usage_spooled_rows") == 0
    assert value(s, "llm_gateway_usage_rejected_rows_total") == 0
    assert (
        value(s, "llm_gateway_quota_refusals_total", scope="user", limit="requests_per_minute") == 1
    )
    text = generate_latest(registry).decode()
    assert "secret" not in text and str(a) not in text  # no key, no tenant id by default


async def test_tenant_label_only_for_listed_tenants(
    pg_dsn: str, pg: asyncpg.Connection, sims: tuple[SimulatedProvider, SimulatedProvider]
) -> None:
    groq, llm7 = sims
    listed = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
    other = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
    registry = CollectorRegistry()
    async with TenantLLMRouter(
        pg_dsn,
        providers=providers(groq, llm7),
        metrics=registry,
        metrics_tenant_labels=[str(listed).upper()],  # any spelling of the id
    ) as router:
        await router.complete_for_tenant(listed, MSG)
        await router.complete_for_tenant(other, MSG)
        await router.complete_for_tenant(other, MSG)
    s = scrape(registry)
    assert value(s, "llm_gateway_requests_total", outcome="success", tenant=str(listed)) == 1
    assert value(s, "llm_gateway_requests_total", outcome="success", tenant="") == 2
    assert str(other) not in generate_latest(registry).decode()
    # A registry whose metrics have no tenant label cannot serve an allow-list.
    plain = CollectorRegistry()
    TenantLLMRouter(pg_dsn, providers=providers(groq, llm7), metrics=plain)
    with pytest.raises(ValueError, match="tenant label"):
        TenantLLMRouter(
            pg_dsn, providers=providers(groq, llm7), metrics=plain, metrics_tenant_labels=[listed]
        )


async def test_enable_turns_metrics_on_for_later_routers(
    pg_dsn: str, pg: asyncpg.Connection, sims: tuple[SimulatedProvider, SimulatedProvider]
) -> None:
    from llm_gateway import metrics

    groq, llm7 = sims
    t = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
    registry = CollectorRegistry()
    assert metrics.enable(registry) is registry
    try:
        async with TenantLLMRouter(pg_dsn, providers=providers(groq, llm7)) as router:
            await router.complete_for_tenant(t, MSG)
    finally:
        metrics.disable()
    del router
    gc.collect()  # a router that is gone leaves its counts in the totals
    assert value(scrape(registry), "llm_gateway_requests_total", outcome="success") == 1
    async with TenantLLMRouter(pg_dsn, providers=providers(groq, llm7)) as router:
        await router.complete_for_tenant(t, MSG)  # made after disable(): not counted
    assert value(scrape(registry), "llm_gateway_requests_total", outcome="success") == 1
    assert (
        value(scrape(registry), "llm_gateway_attempt_duration_seconds_count", provider="groq") == 1
    )


async def test_stream_outcomes_mid_stream_error_and_cancelled(
    pg_dsn: str, pg: asyncpg.Connection, sims: tuple[SimulatedProvider, SimulatedProvider]
) -> None:
    """A stream's end sets its request's outcome: broken after its first chunk, or closed by
    the caller before its end (the labels README lists besides the error classes')."""
    from llm_gateway import MidStreamError

    groq, llm7 = sims
    t = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
    registry = CollectorRegistry()
    async with TenantLLMRouter(pg_dsn, providers=providers(groq, llm7), metrics=registry) as router:
        groq.fail_with = "stream_error_after_first"
        stream = await router.stream_for_tenant(t, MSG)
        with pytest.raises(MidStreamError):
            async with stream:
                async for _ in stream:
                    pass
        groq.fail_with = None
        async with await router.stream_for_tenant(t, MSG) as stream:
            async for _ in stream:
                break  # the caller leaves after the first chunk: the stream is closed unread
        s = scrape(registry)
    assert value(s, "llm_gateway_requests_total", outcome="mid_stream_error") == 1
    assert value(s, "llm_gateway_requests_total", outcome="cancelled") == 1
    assert value(s, "llm_gateway_requests_total", outcome="success") == 0


# --- the dashboard ---------------------------------------------------------------------------

_NAME = re.compile(r"\bllm_gateway_[a-z_]+")


def _targets(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in panels:
        found.extend(panel.get("targets", []))
        found.extend(_targets(panel.get("panels", [])))  # rows may nest panels
    return found


async def test_grafana_dashboard_uses_only_exported_names(
    pg_dsn: str, pg: asyncpg.Connection, sims: tuple[SimulatedProvider, SimulatedProvider]
) -> None:
    groq, llm7 = sims
    t = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
    registry = CollectorRegistry()
    async with TenantLLMRouter(pg_dsn, providers=providers(groq, llm7), metrics=registry) as r:
        await r.complete_for_tenant(t, MSG)
        async with await r.stream_for_tenant(t, MSG) as stream:
            async for _ in stream:
                pass
    # The sample names each family can have (those without a sample yet included).
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    text = generate_latest(registry).decode()
    exported = {
        f.name + suffix for f in text_string_to_metric_families(text) for suffix in suffixes[f.type]
    }
    assert set(scrape(registry)) - {n for n in scrape(registry) if n.endswith("_created")} <= (
        exported
    )
    # Every family the issue names is on the dashboard, and nothing else.
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    assert any(v.get("type") == "datasource" for v in dashboard["templating"]["list"])
    targets = _targets(dashboard["panels"])
    assert len(targets) >= 10
    used: set[str] = set()
    for target in targets:
        names = _NAME.findall(target["expr"])
        assert names, target
        used.update(names)
    unknown = {n for n in used if n not in exported}
    assert not unknown, unknown
    expected_families = {
        "llm_gateway_requests",
        "llm_gateway_attempts",
        "llm_gateway_failovers",
        "llm_gateway_request_duration_seconds",
        "llm_gateway_attempt_duration_seconds",
        "llm_gateway_time_to_first_token_seconds",
        "llm_gateway_tokens",
        "llm_gateway_cost_usd",
        "llm_gateway_breaker_state",
        "llm_gateway_config_cache",
        "llm_gateway_usage_queue_rows",
        "llm_gateway_usage_spooled_rows",
        "llm_gateway_usage_written_rows",
        "llm_gateway_usage_rejected_rows",
        "llm_gateway_quota_refusals",
    }
    assert expected_families <= families(registry)
    covered = {f for f in expected_families if any(n.startswith(f) for n in used)}
    assert covered == expected_families


def test_unique_ids_in_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["type"] in {"timeseries", "stat", "row", "table", "bargauge", "gauge"}
        assert "gridPos" in panel
