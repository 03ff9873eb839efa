"""Prometheus metrics of the router (extra ``[metrics]``: ``prometheus_client``).

Turn them on for every router made afterwards with :func:`enable`, or for one router with
``TenantLLMRouter(metrics=registry)``; serve them with ``prometheus_client.generate_latest``.
The names (a dashboard and alert rules are written against them; ``docs/grafana-dashboard.json``)::

    llm_gateway_requests_total{outcome}
    llm_gateway_attempts_total{provider,model,outcome,key_source}
    llm_gateway_failovers_total{provider,reason}          provider: the one failed over from
    llm_gateway_request_duration_seconds                  histogram
    llm_gateway_attempt_duration_seconds{provider}        histogram
    llm_gateway_time_to_first_token_seconds{provider}     histogram (streams)
    llm_gateway_tokens_total{provider,model,direction}    direction: input, output
    llm_gateway_cost_usd_total{provider,model}
    llm_gateway_breaker_state{provider,key_fp}            0 closed, 1 half-open, 2 open
    llm_gateway_config_cache_total{event}                 hit, miss, stale
    llm_gateway_usage_queue_rows, llm_gateway_usage_spooled_rows
    llm_gateway_usage_written_rows_total, llm_gateway_usage_rejected_rows_total
    llm_gateway_quota_refusals_total{scope,limit}

``model`` is the model as configured (the chain entry's), so its values stay bounded.
Tenant ids are no label by default; a registry enabled with ``tenant_labels=True`` gives the
request, attempt, token, cost, failover and quota counters a ``tenant`` label, set only for
the tenants a router lists in ``metrics_tenant_labels`` (``""`` for the others).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from . import observability

if TYPE_CHECKING:
    from .chain import ChainEntry
    from .observability import Observer

__all__ = ["GatewayMetrics", "bundle", "enable"]

# LLM calls take from a few hundred milliseconds to minutes.
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 30.0)
_BREAKER = {"closed": 0.0, "half_open": 1.0, "open": 2.0}

_bundles: weakref.WeakKeyDictionary[CollectorRegistry, GatewayMetrics] = weakref.WeakKeyDictionary()


def enable(registry: CollectorRegistry | None = None, *, tenant_labels: bool = False) -> Any:
    """Turn metrics on for every router made from now on (without its own ``metrics=``).

    ``registry``: where they are registered (default: ``prometheus_client.REGISTRY``);
    returned. ``tenant_labels``: give the counters a ``tenant`` label, for routers that list
    tenants in ``metrics_tenant_labels``.
    """
    found = bundle(registry, tenant_label=tenant_labels)
    observability._default_metrics = found
    return found.registry


def disable() -> None:
    """Routers made from now on have no metrics unless given ``metrics=``."""
    observability._default_metrics = None


def bundle(registry: CollectorRegistry | None, *, tenant_label: bool = False) -> GatewayMetrics:
    """The metrics registered in ``registry`` (registered on first use; one set per registry)."""
    registry = REGISTRY if registry is None else registry
    found = _bundles.get(registry)
    if found is None:
        found = _bundles[registry] = GatewayMetrics(registry, tenant_label=tenant_label)
    elif tenant_label and not found.tenant_label:
        raise ValueError(
            "this registry's llm_gateway metrics have no tenant label: enable it first with"
            " llm_gateway.metrics.enable(registry, tenant_labels=True)"
        )
    return found


class GatewayMetrics:
    """The metric objects of one registry, with their label children cached per label set."""

    def __init__(self, registry: CollectorRegistry, *, tenant_label: bool) -> None:
        self.registry = registry
        self.tenant_label = tenant_label
        t = ("tenant",) if tenant_label else ()
        self.requests = Counter(
            "llm_gateway_requests", "Requests by outcome.", ("outcome", *t), registry=registry
        )
        self.attempts = Counter(
            "llm_gateway_attempts",
            "Attempts on providers (each is one usage row).",
            ("provider", "model", "outcome", "key_source", *t),
            registry=registry,
        )
        self.failovers = Counter(
            "llm_gateway_failovers",
            "Failovers, by the provider failed over from and why.",
            ("provider", "reason", *t),
            registry=registry,
        )
        self.request_duration = Histogram(
            "llm_gateway_request_duration_seconds",
            "Whole requests, every attempt included (a stream: until its end).",
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.attempt_duration = Histogram(
            "llm_gateway_attempt_duration_seconds",
            "One attempt on one provider.",
            ("provider",),
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "llm_gateway_time_to_first_token_seconds",
            "Streams: from the attempt's start to its first content chunk.",
            ("provider",),
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "llm_gateway_tokens",
            "Tokens of attempts, by direction (input, output).",
            ("provider", "model", "direction", *t),
            registry=registry,
        )
        self.cost = Counter(
            "llm_gateway_cost_usd",
            "Estimated cost of attempts in USD.",
            ("provider", "model", *t),
            registry=registry,
        )
        self.quota_refusals = Counter(
            "llm_gateway_quota_refusals",
            "Requests refused by a budget or rate limit, by scope and limit.",
            ("scope", "limit", *t),
            registry=registry,
        )
        self._state = _StateCollector()
        registry.register(self._state)
        # label values -> child, so a request pays one dict lookup instead of .labels().
        self._children: dict[tuple[Any, ...], Any] = {}

    def watch(self, observer: Observer) -> None:
        self._state.observers.add(observer)

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def _t(self, label: str) -> tuple[str, ...]:
        return (label,) if self.tenant_label else ()

    def attempt(
        self,
        entry: ChainEntry,
        outcome: str,
        latency: float,
        input_tokens: int | None,
        output_tokens: int | None,
        cost: Decimal | None,
        tenant: str,
    ) -> None:
        t = self._t(tenant)
        provider, model = entry.provider, entry.model
        self._child(self.attempts, provider, model, outcome, entry.key_source, *t).inc()
        self._child(self.attempt_duration, provider).observe(latency)
        if input_tokens:
            self._child(self.tokens, provider, model, "input", *t).inc(input_tokens)
        if output_tokens:
            self._child(self.tokens, provider, model, "output", *t).inc(output_tokens)
        if cost:
            self._child(self.cost, provider, model, *t).inc(float(cost))

    def failover(self, provider: str, reason: str, tenant: str = "") -> None:
        self._child(self.failovers, provider, reason, *self._t(tenant)).inc()

    def first_token(self, provider: str, seconds: float) -> None:
        self._child(self.ttft, provider).observe(seconds)

    def request(
        self, outcome: str, seconds: float, tenant: str, error: BaseException | None
    ) -> None:
        t = self._t(tenant)
        self._child(self.requests, outcome, *t).inc()
        self.request_duration.observe(seconds)
        if outcome == "quota_exceeded":
            scope, limit = getattr(error, "scope", ""), getattr(error, "limit", "")
            self._child(self.quota_refusals, str(scope), str(limit), *t).inc()


class _StateCollector:
    """Breakers, config cache and usage writer, read at scrape time from the routers."""

    def __init__(self) -> None:
        self.observers: weakref.WeakSet[Observer] = weakref.WeakSet()

    def describe(self) -> list[Metric]:
        breaker, cache, usage = self._families()
        return [breaker, cache, *usage]

    def collect(self) -> Iterator[Metric]:
        breaker, cache, usage = self._families()
        counts = {"hit": 0, "miss": 0, "stale": 0}
        queued = spooled = written = rejected = 0
        trackers: set[int] = set()
        for observer in list(self.observers):
            health, cache_counts, backlog = observer.state()
            for key in health:
                breaker.add_metric(
                    [key["provider"], key["key_fingerprint"]], _BREAKER.get(key["state"], 0.0)
                )
            for event, n in cache_counts.items():
                counts[event] = counts.get(event, 0) + n
            if backlog is not None and id(backlog) not in trackers:
                trackers.add(id(backlog))
                queued += backlog.queued
                spooled += backlog.spooled_rows
                written += backlog.written_rows
                rejected += backlog.rejected_rows
        for event, n in counts.items():
            cache.add_metric([event], n)
        yield breaker
        yield cache
        q, s, w, r = usage
        q.add_metric([], queued)
        s.add_metric([], spooled)
        w.add_metric([], written)
        r.add_metric([], rejected)
        yield from usage

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily,
        CounterMetricFamily,
        tuple[GaugeMetricFamily, GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily],
    ]:
        return (
            GaugeMetricFamily(
                "llm_gateway_breaker_state",
                "Circuit breaker of each provider key: 0 closed, 1 half-open, 2 open.",
                labels=("provider", "key_fp"),
            ),
            CounterMetricFamily(
                "llm_gateway_config_cache",
                "Tenant config lookups: hit, miss (loaded), stale (served, PostgreSQL failing).",
                labels=("event",),
            ),
            (
                GaugeMetricFamily(
                    "llm_gateway_usage_queue_rows", "Usage rows in memory, not yet written."
                ),
                GaugeMetricFamily(
                    "llm_gateway_usage_spooled_rows", "Usage rows in spool files awaiting replay."
                ),
                CounterMetricFamily(
                    "llm_gateway_usage_written_rows", "Usage rows written to PostgreSQL."
                ),
                CounterMetricFamily(
                    "llm_gateway_usage_rejected_rows",
                    "Usage rows PostgreSQL refused (kept in the spool's rejected/).",
                ),
            ),
        )
