"""The ``traceparent`` (and ``tracestate``, ``baggage``) sent to providers: built by the
gateway when the global propagator is W3C's, so it must be what that propagator writes; any
other propagator (or baggage in the context) still goes through the propagator itself."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import baggage, context, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llm_gateway.chain import ChainEntry
from llm_gateway.tracing import _COMPOSITE, Tracing

# The composite propagator's class under either of its names (opentelemetry-api 1.0 on).
Composite: Any = _COMPOSITE
ENTRY = ChainEntry(
    provider="groq",
    model="llama-3.3-70b-versatile",
    key=None,
    key_source="system",
    fingerprint="f",
    context_window=None,
    price_per_m=None,
)


class Custom(TextMapPropagator):
    """A propagator of another format: the gateway must not write W3C headers instead."""

    def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
        sc = trace.get_current_span(context).get_span_context()
        carrier["x-custom-trace"] = f"{sc.trace_id:x}:{sc.span_id:x}"

    def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
        return context

    @property
    def fields(self) -> set[str]:
        return {"x-custom-trace"}


@pytest.fixture
def textmap() -> Iterator[None]:
    saved = propagate.get_global_textmap()
    yield
    propagate.set_global_textmap(saved)


def expected(span: Any) -> dict[str, str]:
    """What the global propagator writes for ``span``."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def sent(sampler: Sampler, parent: Any = None) -> tuple[dict[str, str] | None, Any]:
    """The headers of a request's first attempt, and the span they carry."""
    tracing = Tracing(TracerProvider(sampler=sampler))
    token = context.attach(parent) if parent is not None else None
    try:
        request = tracing.request(uuid.uuid4(), None, None, stream=False)
        span = request.attempt(ENTRY, 1, None)
        headers = request.headers(span)
    finally:
        if token is not None:
            context.detach(token)
    return headers, span if span is not None else request._span


def remote_parent(state: TraceState, flags: int) -> Any:
    sc = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(flags), trace_state=state)
    return trace.set_span_in_context(NonRecordingSpan(sc))


@pytest.mark.parametrize("sampler", [ALWAYS_ON, ALWAYS_OFF])
@pytest.mark.parametrize(
    "global_textmap",
    [
        None,  # the API's default: tracecontext and baggage
        TraceContextTextMapPropagator(),
        Composite([TraceContextTextMapPropagator()]),
        Composite([W3CBaggagePropagator(), TraceContextTextMapPropagator()]),
    ],
)
def test_w3c_headers_are_what_the_propagator_writes(
    textmap: None, sampler: Sampler, global_textmap: Any
) -> None:
    if global_textmap is not None:
        propagate.set_global_textmap(global_textmap)
    headers, span = sent(sampler)
    assert headers is not None and headers == expected(span)
    sampled = int(headers["traceparent"].rsplit("-", 1)[1], 16) & 1
    assert sampled == (sampler is ALWAYS_ON)


def test_tracestate_of_the_parent_travels(textmap: None) -> None:
    parent = remote_parent(TraceState([("vendor", "v1"), ("other", "x")]), 1)
    headers, span = sent(ALWAYS_ON, parent)
    assert headers is not None and headers == expected(span)
    assert headers["tracestate"] == "vendor=v1,other=x"
    assert headers["traceparent"].startswith(f"00-{0xABC:032x}-")


def test_baggage_in_the_context_goes_through_the_propagator(textmap: None) -> None:
    parent = baggage.set_baggage("tenant.tier", "gold")
    headers, span = sent(ALWAYS_OFF, parent)
    assert headers is not None and headers["baggage"] == "tenant.tier=gold"
    token = context.attach(parent)
    try:
        assert headers == expected(span)
    finally:
        context.detach(token)


def test_another_propagator_writes_its_own_headers(textmap: None) -> None:
    propagate.set_global_textmap(Custom())
    headers, span = sent(ALWAYS_ON)
    sc = span.get_span_context()
    assert headers == {"x-custom-trace": f"{sc.trace_id:x}:{sc.span_id:x}"}


def test_no_headers_without_a_valid_context() -> None:
    # NoOpTracerProvider; _DefaultTracerProvider in opentelemetry-api 1.0.
    no_op = vars(trace).get("NoOpTracerProvider") or vars(trace)["_DefaultTracerProvider"]
    request = Tracing(no_op()).request("t", None, None, stream=False)
    assert request.attempt(ENTRY, 1, None) is None
    assert request.headers(None) is None


def test_tenant_strings_are_the_ids() -> None:
    tracing = Tracing(TracerProvider(sampler=ALWAYS_OFF))
    ids = [uuid.uuid4() for _ in range(5000)]  # more than are remembered
    for t in [*ids, *ids[:10]]:
        assert tracing._tenant(t) == str(t)
    assert tracing._tenant("acme") == "acme"
