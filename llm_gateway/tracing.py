"""OpenTelemetry spans of the router (extra ``[otel]``: ``opentelemetry-api``).

On with ``TenantLLMRouter(tracer_provider=...)`` or ``tracing=True`` (the global provider).
One span per request (``llm_gateway.chat``, internal) with one child span per attempt
(``chat {model}``, client), whose context is sent to the provider as ``traceparent`` (by the
global propagator). Attributes follow the OpenTelemetry GenAI semantic conventions
(``gen_ai.system`` is the gateway's provider name, e.g. ``groq``), plus the gateway's own under
``llm_gateway.*``: tenant, request id, attempt number, key source, failover reason. Spans never
hold a key, nor message content unless the router was made with ``trace_content=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import __version__

if TYPE_CHECKING:
    from .chain import ChainEntry
    from .types import CompletionResult

__all__ = ["RequestTrace", "Tracing"]


class Tracing:
    """The tracer of one router."""

    __slots__ = ("tracer",)

    def __init__(self, tracer_provider: Any = None) -> None:
        # None: the global provider (whatever the application installed, else a no-op).
        self.tracer = trace.get_tracer("llm_gateway", __version__, tracer_provider)

    def request(
        self,
        tenant: str,
        model: str | None,
        messages: Sequence[Mapping[str, Any]] | None,
        stream: bool,
    ) -> RequestTrace:
        """Start a request's span, a child of the caller's current span."""
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "llm_gateway.tenant": tenant,
            "llm_gateway.stream": stream,
        }
        if model is not None:
            attributes["gen_ai.request.model"] = model
        if messages is not None:
            attributes["gen_ai.input.messages"] = _json(messages)
        span = self.tracer.start_span("llm_gateway.chat", attributes=attributes)
        return RequestTrace(self.tracer, span, content=messages is not None)


class RequestTrace:
    """The spans of one request."""

    __slots__ = ("_content", "_context", "_headers", "_recording", "_span", "_tracer")

    def __init__(self, tracer: Any, span: Any, *, content: bool) -> None:
        self._tracer = tracer
        self._span = span
        self._context = trace.set_span_in_context(span)
        self._content = content
        # Sampled out: no attempt spans, the request's context is what travels.
        self._recording = span.is_recording()
        self._headers: dict[str, str] | None = None

    def set_attribute(self, name: str, value: Any) -> None:
        if self._recording:
            self._span.set_attribute(name, value)

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
        return self._tracer.start_span(
            f"chat {entry.model}",
            context=self._context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )

    def headers(self, span: Any | None) -> dict[str, str] | None:
        """The headers that carry ``span``'s context (``None``: the request's, sampled out)
        to the provider: ``traceparent``, by the global propagator."""
        if span is None:
            if self._headers is None:
                self._headers = {}
                propagate.inject(self._headers, context=self._context)
            return self._headers or None
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return carrier or None

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
            span.set_attributes(attributes)
            if error is not None:
                _error(span, outcome, error)
        span.end()


def _error(span: Any, outcome: str, error: BaseException) -> None:
    """Mark ``span`` failed. Gateway errors' messages never hold a key (their contract)."""
    span.set_attribute("error.type", type(error).__name__)
    span.set_status(Status(StatusCode.ERROR, f"{outcome}: {type(error).__name__}"))
    span.record_exception(error, escaped=True)


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:
        return "[unserialisable]"
