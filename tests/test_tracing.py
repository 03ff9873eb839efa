"""OpenTelemetry spans: one per request, one child per attempt, GenAI attributes, errors on
the span, ``traceparent`` received by the (simulated) provider; no key, no content."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llm_gateway import TenantLLMRouter, provider_settings
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import make_tenant

MSG = [{"role": "user", "content": "a private question"}]
KEYS = ("gsk-system-secret", "llm7-system-secret", "gsk-tenant-secret")


@pytest.fixture
async def sims() -> AsyncIterator[tuple[SimulatedProvider, SimulatedProvider]]:
    groq, llm7 = SimulatedProvider(name="groq"), SimulatedProvider(name="llm7")
    async with groq, llm7:
        yield groq, llm7


@pytest.fixture
def exporter() -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


def providers(groq: SimulatedProvider, llm7: SimulatedProvider) -> dict[str, Any]:
    return {
        "groq": provider_settings("groq", groq.root_url, api_key=KEYS[0]),
        "llm7": provider_settings("llm7", llm7.base_url, api_key=KEYS[1]),
    }


def dump(spans: tuple[ReadableSpan, ...]) -> str:
    """Everything a span exporter would send, as one string."""
    return repr(
        [(s.name, dict(s.attributes or {}), [(e.name, dict(e.attributes or {})) for e in s.events])
         for s in spans]
    )  # fmt: skip


async def test_request_and_attempt_spans_of_a_failover(
    pg_dsn: str,
    pg: asyncpg.Connection,
    sims: tuple[SimulatedProvider, SimulatedProvider],
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    groq, llm7 = sims
    tracer_provider, memory = exporter
    t = await make_tenant(
        pg,
        llm_tokens={"groq": KEYS[2]},
        inference_config={"preferred_provider": "groq", "fallback_order": ["llm7"]},
    )
    outer = tracer_provider.get_tracer("app")
    async with TenantLLMRouter(
        pg_dsn, providers=providers(groq, llm7), tracer_provider=tracer_provider
    ) as router:
        groq.script("500")
        with outer.start_as_current_span("handler") as handler:
            result = await router.complete_for_tenant(t, MSG)
    assert result.provider == "llm7"
    spans = memory.get_finished_spans()
    by_name: dict[str, list[ReadableSpan]] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    [request] = by_name["llm_gateway.chat"]
    [failed] = by_name["chat llama-3.3-70b-versatile"]
    [served] = by_name["chat gpt-4o-mini"]
    # The request is a child of the caller's span; each attempt a child of the request.
    assert request.parent is not None
    assert request.parent.span_id == handler.get_span_context().span_id
    for attempt in (failed, served):
        assert attempt.parent is not None and attempt.parent.span_id == request.context.span_id
        assert attempt.context.trace_id == handler.get_span_context().trace_id
        assert attempt.kind is SpanKind.CLIENT
    a = dict(failed.attributes or {})
    assert a["gen_ai.system"] == "groq"
    assert a["gen_ai.request.model"] == "llama-3.3-70b-versatile"
    assert a["llm_gateway.attempt"] == 1
    assert a["llm_gateway.key_source"] == "tenant"
    assert a["llm_gateway.outcome"] == "error"
    assert a["error.type"] == "ServerError"
    assert failed.status.status_code is StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]
    b = dict(served.attributes or {})
    assert b["gen_ai.system"] == "llm7"
    assert b["llm_gateway.attempt"] == 2
    assert b["llm_gateway.key_source"] == "system"
    assert (b["llm_gateway.failover.from"], b["llm_gateway.failover.reason"]) == ("groq", "error")
    assert b["gen_ai.response.model"] == result.model
    assert b["gen_ai.usage.input_tokens"] == result.tokens_input
    assert b["gen_ai.usage.output_tokens"] == result.tokens_output
    assert served.status.status_code is StatusCode.UNSET
    r = dict(request.attributes or {})
    assert r["llm_gateway.tenant"] == str(t)
    assert r["llm_gateway.request_id"] == str(result.request_id)
    assert (r["gen_ai.system"], r["llm_gateway.outcome"]) == ("llm7", "success")
    assert r["gen_ai.usage.output_tokens"] == result.tokens_output
    # Each provider request carried its own attempt's context.
    for sim, span in ((groq, failed), (llm7, served)):
        [sent] = [q for q in sim.requests if q.path.endswith("/chat/completions")]
        _version, trace_id, span_id, _flags = sent.headers["traceparent"].split("-")
        assert (int(trace_id, 16), int(span_id, 16)) == (
            span.context.trace_id,
            span.context.span_id,
        )
        assert sent.api_key in KEYS  # the key still travels, only as the Authorization header
    text = dump(spans)
    assert not any(k in text for k in KEYS)
    assert "private question" not in text and "[llm7]" not in text  # no content by default


async def test_a_failed_request_is_an_error_span_and_streams_end_their_span(
    pg_dsn: str,
    pg: asyncpg.Connection,
    sims: tuple[SimulatedProvider, SimulatedProvider],
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    groq, _llm7 = sims
    tracer_provider, memory = exporter
    t = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
    async with TenantLLMRouter(
        pg_dsn,
        providers={"groq": provider_settings("groq", groq.root_url, api_key=KEYS[0])},
        tracer_provider=tracer_provider,
    ) as router:
        groq.script("400")
        with pytest.raises(Exception, match="HTTP 400"):
            await router.complete_for_tenant(t, MSG)
        [request] = [s for s in memory.get_finished_spans() if s.name == "llm_gateway.chat"]
        assert request.status.status_code is StatusCode.ERROR
        assert dict(request.attributes or {})["llm_gateway.outcome"] == "provider_error"
        memory.clear()
        stream = await router.stream_for_tenant(t, MSG)
        # Open stream: its attempt and request spans are not finished yet.
        assert memory.get_finished_spans() == ()
        async with stream:
            async for _ in stream:
                pass
    names = sorted(s.name for s in memory.get_finished_spans())
    assert names == ["chat llama-3.3-70b-versatile", "llm_gateway.chat"]
    [request] = [s for s in memory.get_finished_spans() if s.name == "llm_gateway.chat"]
    assert dict(request.attributes or {})["llm_gateway.stream"] is True
    [sent] = [q for q in groq.requests if q.stream]
    assert "traceparent" in sent.headers


async def test_content_only_when_opted_in(
    pg_dsn: str,
    pg: asyncpg.Connection,
    sims: tuple[SimulatedProvider, SimulatedProvider],
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    groq, llm7 = sims
    tracer_provider, memory = exporter
    t = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
    async with TenantLLMRouter(
        pg_dsn,
        providers=providers(groq, llm7),
        tracer_provider=tracer_provider,
        trace_content=True,
    ) as router:
        result = await router.complete_for_tenant(t, MSG)
    [request] = [s for s in memory.get_finished_spans() if s.name == "llm_gateway.chat"]
    a = dict(request.attributes or {})
    assert "a private question" in str(a["gen_ai.input.messages"])
    assert result.content in str(a["gen_ai.output.messages"])
    assert not any(k in dump(memory.get_finished_spans()) for k in KEYS)


async def test_tracing_true_uses_the_global_provider(
    pg_dsn: str,
    pg: asyncpg.Connection,
    sims: tuple[SimulatedProvider, SimulatedProvider],
    exporter: tuple[TracerProvider, InMemorySpanExporter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    groq, llm7 = sims
    tracer_provider, memory = exporter
    # The API's global provider can be set once per process: patch the getter instead.
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: tracer_provider)
    t = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
    async with TenantLLMRouter(pg_dsn, providers=providers(groq, llm7), tracing=True) as router:
        await router.complete_for_tenant(t, MSG)
    assert {s.name for s in memory.get_finished_spans()} == {
        "llm_gateway.chat",
        "chat llama-3.3-70b-versatile",
    }


async def test_sampled_out_requests_still_propagate_their_context(
    pg_dsn: str, pg: asyncpg.Connection, sims: tuple[SimulatedProvider, SimulatedProvider]
) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    groq, llm7 = sims
    memory = InMemorySpanExporter()
    tracer_provider = TracerProvider(sampler=ALWAYS_OFF)
    tracer_provider.add_span_processor(SimpleSpanProcessor(memory))
    t = await make_tenant(
        pg, inference_config={"preferred_provider": "groq", "fallback_order": ["llm7"]}
    )
    async with TenantLLMRouter(
        pg_dsn, providers=providers(groq, llm7), tracer_provider=tracer_provider
    ) as router:
        groq.script("500")
        await router.complete_for_tenant(t, MSG)
    assert memory.get_finished_spans() == ()
    sent = [q.headers["traceparent"] for q in (*groq.requests, *llm7.requests)]
    assert len(sent) == 2 and sent[0] == sent[1]  # the request's own context, not sampled
    assert int(sent[0].rsplit("-", 1)[1], 16) & 1 == 0  # the sampled flag is off
