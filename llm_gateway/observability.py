"""Metrics and spans behind one small interface: the hooks the router calls, off by default.

A router with neither metrics nor tracing has no :class:`Observer` (``None``): each hook site
is one ``is None`` test and nothing else. With either on, the router makes one
:class:`RequestObservation` per request; the attempt loop tells it when each attempt starts
(it returns the ``traceparent`` headers to send) and :class:`~.ledger.RequestLedger` when
each attempt ends (the same call that queues its usage row). Prometheus
(:mod:`.metrics`) and OpenTelemetry (:mod:`.tracing`) are imported only when asked for.

State that already lives somewhere (breaker states, the config cache's counters, the usage
writer's backlog) is not pushed on the hot path: the metrics collector reads it at scrape
time through :meth:`Observer.state`.

Logs need no observer: failovers, failed requests and breaker transitions are logged at INFO
under the ``llm_gateway`` logger with structured ``extra`` fields (:data:`LOG_FIELDS`).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .errors import GatewayError

if TYPE_CHECKING:
    from usage import ModelUsageTracker

    from .chain import ChainEntry
    from .health import HealthRegistry
    from .metrics import Counts, GatewayMetrics
    from .tracing import Tracing
    from .types import CompletionResult

__all__ = ["LOG_FIELDS", "Observer", "RequestObservation", "build_observer", "request_outcome"]

# The ``extra`` fields of the router's log records (JSON formatters pick them up).
LOG_FIELDS = ("request_id", "tenant", "provider", "attempt", "outcome")

# Set by llm_gateway.metrics.enable(): the metrics of routers built without ``metrics=``.
_default_metrics: GatewayMetrics | None = None


def request_outcome(error: BaseException | None) -> str:
    """The ``outcome`` label of a request that ended with ``error`` (``None``: success)."""
    if error is None:
        return "success"
    if isinstance(error, GatewayError):
        return error.outcome  # each error class names its label
    if type(error).__name__ == "CancelledError":
        return "cancelled"
    return "error"


class Observer:
    """One router's metrics and tracing; made once, by :func:`build_observer`."""

    __slots__ = (
        "__weakref__",
        "_store",
        "_tracker",
        "counts",
        "health",
        "metrics",
        "tenant_labels",
        "trace_content",
        "tracing",
    )

    def __init__(
        self,
        metrics: GatewayMetrics | None,
        tracing: Tracing | None,
        *,
        tenant_labels: Iterable[uuid.UUID | str] = (),
        trace_content: bool = False,
    ) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.counts: Counts | None = None if metrics is None else metrics.new_counts()
        # Canonical ids (a UUID's str) and the strings as given: either spelling matches.
        labels: set[str] = set()
        for t in tenant_labels:
            labels.add(str(t))
            with contextlib.suppress(ValueError):
                labels.add(str(uuid.UUID(str(t))))
        self.tenant_labels = frozenset(labels)
        self.trace_content = trace_content
        self.health: HealthRegistry | None = None
        self._store: Any = None
        self._tracker: Callable[[], ModelUsageTracker | None] | None = None

    def watch(
        self,
        health: HealthRegistry,
        store: Any,
        tracker: Callable[[], ModelUsageTracker | None],
    ) -> None:
        """Where scrape-time state comes from: breakers, config cache counters, usage writer."""
        self.health, self._store, self._tracker = health, store, tracker
        if self.metrics is not None:
            self.metrics.watch(self)

    def state(self) -> tuple[list[dict[str, Any]], Mapping[str, int], Any, Any]:
        """Health snapshot, config cache counters, usage backlog and tracker (``None``: no
        tracker yet)."""
        health = self.health.snapshot() if self.health is not None else []
        store = self._store
        cache = (
            {"hit": store.hits, "miss": store.misses, "stale": store.stale}
            if store is not None
            else {}
        )
        tracker = self._tracker() if self._tracker is not None else None
        return health, cache, tracker.backlog() if tracker is not None else None, tracker


class RequestObservation:
    """One request as metrics and traces see it; the router makes one per request when it
    has an observer (``RequestObservation(observer, tenant_id, model, messages, stream)``)."""

    __slots__ = (
        "_attempts",
        "_counts",
        "_failed",
        "_label",
        "_number",
        "_t0",
        "_trace",
        "done",
    )

    def __init__(
        self,
        observer: Observer,
        tenant_id: uuid.UUID | str,
        model: str | None,
        messages: Sequence[Mapping[str, Any]],
        stream: bool,
    ) -> None:
        self._t0 = time.monotonic()
        self._counts = observer.counts
        self._label = ""
        if observer.tenant_labels:  # str(UUID) costs: only when it is used
            tenant = str(tenant_id)
            if tenant in observer.tenant_labels:
                self._label = tenant
        tracing = observer.tracing
        self._trace = (
            None
            if tracing is None
            else tracing.request(
                tenant_id, model, messages if observer.trace_content else None, stream
            )
        )
        # Attempts started and not ended yet: (entry, its span or None).
        self._attempts: list[tuple[ChainEntry, Any]] = []
        self._number = 0
        self._failed: tuple[str, str] | None = None  # (provider, reason) of the last failure
        self.done = False

    def begun(self, request_id: uuid.UUID, tenant_id: uuid.UUID) -> None:
        """The request was planned and admitted (its id and canonical tenant are known)."""
        if self._trace is not None:
            self._trace.begun(request_id)

    def failover(self, provider: str, reason: str) -> None:
        """The attempt loop moves on from ``provider``, which failed with ``reason``."""
        self._failed = (provider, reason)
        if self._counts is not None:
            self._counts.failover(provider, reason, self._label)

    def attempt_started(self, entry: ChainEntry) -> Mapping[str, str] | None:
        """An attempt on ``entry`` starts now; returns the trace headers to send with it."""
        trace = self._trace
        if trace is None:  # metrics alone: only which attempts are open
            self._attempts.append((entry, None))
            return None
        self._number += 1
        failed, self._failed = self._failed, None
        span = trace.attempt(entry, self._number, failed)
        self._attempts.append((entry, span))
        return trace.headers(span)

    def attempt_ended(
        self,
        entry: ChainEntry,
        outcome: str,
        latency: float,
        model: str,
        input_tokens: int | None,
        output_tokens: int | None,
        cost: Decimal | None,
        error: BaseException | None,
    ) -> None:
        """An attempt ended (its usage row was just queued). A row with no started attempt
        (a quota refusal's) is not an attempt and is ignored."""
        attempts = self._attempts
        if attempts and attempts[0][0] is entry:  # the usual case: one attempt at a time
            span = attempts.pop(0)[1]
        else:
            for i, opened in enumerate(attempts):
                if opened[0] is entry:
                    span = opened[1]
                    del attempts[i]
                    break
            else:
                return
        m = self._counts
        if m is not None:
            m.attempt(entry, outcome, latency, input_tokens, output_tokens, cost, self._label)
        if span is not None:
            self._trace.attempt_ended(  # type: ignore[union-attr]
                span, outcome, model, input_tokens, output_tokens, cost, error
            )

    def first_token(self, entry: ChainEntry, seconds: float) -> None:
        """A stream's first content chunk arrived ``seconds`` after its attempt started."""
        if self._counts is not None:
            self._counts.first_token(entry.provider, seconds)
        for started, span in self._attempts:
            if started is entry and span is not None:
                span.set_attribute("llm_gateway.time_to_first_token_s", seconds)

    def ended(
        self,
        result: CompletionResult | None,
        error: BaseException | None,
        outcome: str | None = None,
    ) -> None:
        """The request ended (a stream: when it was read to the end or closed); once.
        ``outcome``: the label, when ``error`` does not say it (a stream's end)."""
        if self.done:
            return
        self.done = True
        if outcome is None:
            outcome = "success" if error is None else request_outcome(error)
        if self._counts is not None:
            self._counts.request(outcome, time.monotonic() - self._t0, self._label, error)
        trace = self._trace
        if trace is not None:
            for _, span in self._attempts:  # never sent (an unserialisable request)
                if span is not None:
                    span.end()
            trace.ended(outcome, result, error)
        self._attempts.clear()


def build_observer(
    *,
    metrics: Any = None,
    tracer_provider: Any = None,
    tracing: bool = False,
    tenant_labels: Iterable[uuid.UUID | str] | None = None,
    trace_content: bool = False,
) -> Observer | None:
    """The router's observer, or ``None`` when neither metrics nor tracing is on.

    ``metrics``: a ``prometheus_client`` registry, ``True`` (the default registry) or ``None``
    (the registry given to :func:`llm_gateway.metrics.enable`, if it was called).
    ``tracer_provider``: an OpenTelemetry ``TracerProvider``; ``tracing=True``: the global one.
    """
    bundle: GatewayMetrics | None = None
    labels = list(tenant_labels or ())
    if metrics is not None and metrics is not False:
        from . import metrics as prom

        bundle = prom.bundle(None if metrics is True else metrics, tenant_label=bool(labels))
    elif _default_metrics is not None:
        bundle = _default_metrics
        if labels and not bundle.tenant_label:
            raise ValueError(
                "metrics_tenant_labels needs a registry with a tenant label:"
                " llm_gateway.metrics.enable(registry, tenant_labels=True)"
            )
    trace: Tracing | None = None
    if tracer_provider is not None or tracing:
        from .tracing import Tracing

        trace = Tracing(tracer_provider)
    if bundle is None and trace is None:
        return None
    return Observer(bundle, trace, tenant_labels=labels, trace_content=trace_content)
