"""OpenTelemetry spans of the router (extra ``[otel]``: ``opentelemetry-api``).

On with ``TenantLLMRouter(tracer_provider=...)`` or ``tracing=True`` (the global provider).
One span per request (``llm_gateway.chat``, internal) with one child span per attempt
(``chat {model}``, client), whose context is sent to the provider as ``traceparent`` (by the
global propagator). Attributes follow the OpenTelemetry GenAI semantic conventions
(``gen_ai.system`` is the gateway's provider name, e.g. ``groq``), plus the gateway's own under
``llm_gateway.*``: tenant, request id, attempt number, key source, failover reason. Spans never
hold a key, nor message content unless the router was made with ``trace_content=True``.

Cost (bench/bench_observability_callgrind.py): a request the sampler drops pays the SDK's
``start_span`` and our ``traceparent``, nothing else; a recorded one pays the SDK's two spans
and few calls into them (attributes given at ``start_span`` and in one ``set_attributes`` at
the end: the SDK takes its lock and checks the attributes once per call).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
from opentelemetry import baggage, context, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators import composite
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import __version__

if TYPE_CHECKING:
    from .chain import ChainEntry
    from .types import CompletionResult

__all__ = ["RequestTrace", "Tracing"]

_W3C = (TraceContextTextMapPropagator, W3CBaggagePropagator)
# The composite propagator's class: CompositeHTTPPropagator in opentelemetry-api 1.0.
_COMPOSITE: Any = vars(composite).get("CompositePropagator") or vars(composite).get(
    "CompositeHTTPPropagator"
)
_TENANTS_KEPT = 4096  # tenant id strings remembered (str(UUID) is slow); then forgotten


class Tracing:
    """The tracer of one router."""

    __slots__ = ("_tenants", "_textmap", "_w3c", "tracer")

    def __init__(self, tracer_provider: Any = None) -> None:
        # None: the global provider (whatever the application installed, else a no-op).
        self.tracer = trace.get_tracer("llm_gateway", __version__, tracer_provider)
        self._tenants: dict[int, str] = {}
        self._textmap: Any = None  # the global propagator last looked at, and whether
        self._w3c = False  # it is W3C trace context (with baggage or not) only

    def request(
        self,
        tenant: uuid.UUID | str,
        model: str | None,
        messages: Sequence[Mapping[str, Any]] | None,
        stream: bool,
    ) -> RequestTrace:
        """Start a request's span, a child of the caller's current span."""
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "llm_gateway.tenant": self._tenant(tenant),
            "llm_gateway.stream": stream,
        }
        if model is not None:
            attributes["gen_ai.request.model"] = model
        if messages is not None:
            attributes["gen_ai.input.messages"] = _json(messages)
        span = self.tracer.start_span("llm_gateway.chat", attributes=attributes)
        return RequestTrace(self, span, content=messages is not None)

    def _tenant(self, tenant: uuid.UUID | str) -> str:
        if type(tenant) is not uuid.UUID:
            return str(tenant)
        key = tenant.int
        found = self._tenants.get(key)
        if found is None:
            if len(self._tenants) >= _TENANTS_KEPT:
                self._tenants.clear()
            found = self._tenants[key] = str(tenant)
        return found

    def w3c(self) -> bool:
        """Whether the global propagator writes W3C trace context (and baggage) only, as the
        API's default does: then ``traceparent`` is built here, the same, at a quarter of
        what the propagator takes."""
        textmap = propagate.get_global_textmap()
        if textmap is not self._textmap:
            self._textmap, self._w3c = textmap, _is_w3c(textmap)
        return self._w3c


def _no_baggage() -> bool:
    """Whether the current context holds no baggage (an empty context, the cheap answer)."""
    current = context.get_current()
    return not current or not baggage.get_all(current)


def _is_w3c(textmap: Any) -> bool:
    if type(textmap) is TraceContextTextMapPropagator:
        return True
    inner = getattr(textmap, "_propagators", None) if type(textmap) is _COMPOSITE else None
    return (
        isinstance(inner, (list, tuple))
        and TraceContextTextMapPropagator in {type(p) for p in inner}
        and all(type(p) in _W3C for p in inner)
    )


class RequestTrace:
    """The spans of one request."""

    __slots__ = (
        "_content",
        "_context",
        "_headers",
        "_plain",
        "_recording",
        "_request_id",
        "_span",
        "_tracing",
    )

    def __init__(self, tracing: Tracing, span: Any, *, content: bool) -> None:
        self._tracing = tracing
        self._span = span
        self._content = content
        # Sampled out: no attempt spans, no attributes, the request's context is what travels.
        self._recording = recording = span.is_recording()
        # The request's context: the attempt spans' parent (made only when there are some).
        self._context: Any = trace.set_span_in_context(span) if recording else None
        self._headers: dict[str, str] | None = None  # the request's own (sampled out)
        self._plain: bool | None = None  # traceparent built here (see Tracing.w3c)
        self._request_id: uuid.UUID | None = None

    def begun(self, request_id: uuid.UUID) -> None:
        """The request's id, set on its span with the attributes of its end (one call)."""
        self._request_id = request_id

    def attempt(self, entry: ChainEntry, number: int, failed: tuple[str, str] | None) -> Any | None:
        """Start an attempt's span (a child of the request's); ``None`` when sampled out."""
        if not self._recording:
            return None
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": entry.provider,
            "gen_ai.request.model": entry.model,
            "llm_gateway.attempt": number,
            "llm_gateway.key_source": entry.key_source,
        }
        if failed is not None:
            attributes["llm_gateway.failover.from"] = failed[0]
            attributes["llm_gateway.failover.reason"] = failed[1]
        return self._tracing.tracer.start_span(
            f"chat {entry.model}",
            context=self._context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )

    def headers(self, span: Any | None) -> dict[str, str] | None:
        """The headers that carry ``span``'s context (``None``: the request's, sampled out)
        to the provider: ``traceparent``, as the global propagator writes it."""
        if span is None:
            if self._headers is None:
                self._headers = self._inject(self._span)
            return self._headers or None
        return self._inject(span) or None

    def _inject(self, span: Any) -> dict[str, str]:
        plain = self._plain
        if plain is None:  # once per request: the caller's baggage goes through the propagator
            plain = self._plain = self._tracing.w3c() and _no_baggage()
        carrier: dict[str, str] = {}
        if plain:
            # What TraceContextTextMapPropagator.inject writes, without its lookups. A
            # SpanContext is the tuple (trace_id, span_id, is_remote, trace_flags,
            # trace_state, is_valid) in every API version since 1.0.
            trace_id, span_id, _, flags, state, valid = span.get_span_context()
            if valid:
                # %-formatting: a third cheaper than the f-string here (callgrind).
                tp = "00-%032x-%016x-%02x" % (trace_id, span_id, flags)  # noqa: UP031
                carrier["traceparent"] = tp
                if state:
                    carrier["tracestate"] = state.to_header()
        else:
            propagate.inject(carrier, context=trace.set_span_in_context(span))
        return carrier

    @staticmethod
    def attempt_ended(
        span: Any,
        outcome: str,
        model: str,
        input_tokens: int | None,
        output_tokens: int | None,
        cost: Decimal | None,
        error: BaseException | None,
    ) -> None:
        attributes: dict[str, Any] = {
            "llm_gateway.outcome": outcome,
            "gen_ai.response.model": model,
        }
        if input_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = input_tokens
        if output_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = output_tokens
        if cost:
            attributes["llm_gateway.cost_usd"] = float(cost)
        if error is not None:
            attributes["error.type"] = type(error).__name__
        span.set_attributes(attributes)  # one call: the SDK locks once
        if error is not None:
            _error(span, outcome, error)
        span.end()

    def ended(
        self, outcome: str, result: CompletionResult | None, error: BaseException | None
    ) -> None:
        span = self._span
        if self._recording:
            attributes: dict[str, Any] = {"llm_gateway.outcome": outcome}
            if self._request_id is not None:
                attributes["llm_gateway.request_id"] = str(self._request_id)
            if result is not None:
                attributes["gen_ai.system"] = result.provider
                attributes["gen_ai.response.model"] = result.model
                attributes["llm_gateway.attempts"] = len(result.attempts)
                if result.tokens_input is not None:
                    attributes["gen_ai.usage.input_tokens"] = result.tokens_input
                if result.tokens_output is not None:
                    attributes["gen_ai.usage.output_tokens"] = result.tokens_output
                if self._content:
                    answer = [{"role": "assistant", "content": result.content}]
                    attributes["gen_ai.output.messages"] = _json(answer)
            if error is not None:
                attributes["error.type"] = type(error).__name__
            span.set_attributes(attributes)
            if error is not None:
                _error(span, outcome, error)
        span.end()


def _error(span: Any, outcome: str, error: BaseException) -> None:
    """Mark ``span`` failed (its ``error.type`` is set). Gateway errors' messages never hold a
    key (their contract)."""
    span.set_status(Status(StatusCode.ERROR, f"{outcome}: {type(error).__name__}"))
    span.record_exception(error, escaped=True)


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:
        return "[unserialisable]"
