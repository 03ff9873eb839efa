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
Counting costs a request two dict lookups (one slot per attempt, one per request; about 5 %
of the router's own instructions, bench/bench_observability_callgrind.py): each router keeps
plain counters (one event loop thread each), and one collector per registry turns them into
metric families at scrape time; a router that is gone leaves its counts in the totals.
Tenant ids are no label by default; a registry enabled with ``tenant_labels=True`` gives the
request, attempt, token, cost, failover and quota counters a ``tenant`` label, set only for
the tenants a router lists in ``metrics_tenant_labels`` (``""`` for the others).
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from . import observability

if TYPE_CHECKING:
    from .chain import ChainEntry
    from .observability import Observer

__all__ = ["GatewayMetrics", "bundle", "disable", "enable"]

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


class _Histogram:
    """Bucket counts (not cumulative), sum and count of one label set."""

    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.count = 0
        self.sum = 0.0


class Counts:
    """One router's counters: label values -> value. Updated on its event loop only.

    An attempt touches one slot, ``attempts[(provider, model, outcome, key_source[, tenant])]``
    = ``[attempts, input tokens, output tokens, cost, duration buckets, duration sum]``, and a
    request one, ``requests[(outcome[, tenant])]`` = ``[requests, buckets, sum]``: the token,
    cost and histogram series are sums over them, made at scrape time (:meth:`series`,
    :meth:`histograms`). Cost is summed as the Decimal it comes as (cheaper than float()).
    """

    __slots__ = ("attempts", "failovers", "quota", "requests", "tenant_label", "ttft")

    def __init__(self, tenant_label: bool = False) -> None:
        self.tenant_label = tenant_label
        self.requests: dict[tuple[str, ...], list[Any]] = {}
        self.attempts: dict[tuple[str, ...], list[Any]] = {}
        self.failovers: dict[tuple[str, ...], float] = {}
        self.quota: dict[tuple[str, ...], float] = {}
        self.ttft: dict[str, list[Any]] = {}  # provider -> [streams, buckets, sum]

    def merge(self, other: Counts) -> None:
        for name in ("failovers", "quota"):
            mine: dict[tuple[str, ...], float] = getattr(self, name)
            for key, n in list(getattr(other, name).items()):
                mine[key] = mine.get(key, 0.0) + n
        for name, fresh in (
            ("requests", _request_slot),
            ("attempts", _attempt_slot),
            ("ttft", _ttft_slot),
        ):
            slots: dict[tuple[str, ...], list[Any]] = getattr(self, name)
            for key, slot in list(getattr(other, name).items()):
                into = slots.get(key)
                if into is None:
                    into = slots[key] = fresh()
                for i, n in enumerate(slot):
                    if isinstance(n, list):
                        for j, k in enumerate(n):
                            into[i][j] += k
                    else:
                        into[i] += n

    def series(self) -> dict[str, dict[tuple[str, ...], float]]:
        """The counters' label values -> value, by attribute name of the collector's table."""
        attempts: dict[tuple[str, ...], float] = {}
        tokens: dict[tuple[str, ...], float] = {}
        cost: dict[tuple[str, ...], float] = {}
        for key, (n, tokens_in, tokens_out, usd, _, _) in self.attempts.items():
            provider, model, tenant = key[0], key[1], key[4:]  # tenant: () or (tenant,)
            attempts[key] = float(n)
            for direction, k in (("input", tokens_in), ("output", tokens_out)):
                if k:
                    label = (provider, model, direction, *tenant)
                    tokens[label] = tokens.get(label, 0.0) + k
            if usd:
                label = (provider, model, *tenant)
                cost[label] = cost.get(label, 0.0) + float(usd)
        return {
            "requests": {key: float(slot[0]) for key, slot in self.requests.items()},
            "attempts": attempts,
            "failovers": self.failovers,
            "tokens": tokens,
            "cost": cost,
            "quota": self.quota,
        }

    def histograms(self) -> dict[str, dict[tuple[str, ...], _Histogram]]:
        """The histograms' label values -> histogram, by attribute name of the collector's."""
        requests: dict[tuple[str, ...], _Histogram] = {}
        for n, buckets, total in self.requests.values():
            _add(requests, (), _DURATION_BUCKETS, n, buckets, total)
        attempts: dict[tuple[str, ...], _Histogram] = {}
        for key, (n, _, _, _, buckets, total) in self.attempts.items():
            _add(attempts, (key[0],), _DURATION_BUCKETS, n, buckets, total)
        ttft: dict[tuple[str, ...], _Histogram] = {}
        for provider, (n, buckets, total) in self.ttft.items():
            _add(ttft, (provider,), _TTFT_BUCKETS, n, buckets, total)
        return {"request_durations": requests, "attempt_durations": attempts, "ttft": ttft}

    # --- the hot path: one slot per attempt, one per request ---------------------------

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
        key: tuple[str, ...] = (
            (entry.provider, entry.model, outcome, entry.key_source, tenant)
            if self.tenant_label
            else (entry.provider, entry.model, outcome, entry.key_source)
        )
        slot = self.attempts.get(key)
        if slot is None:
            slot = self.attempts[key] = _attempt_slot()
        slot[0] += 1
        if input_tokens:
            slot[1] += input_tokens
        if output_tokens:
            slot[2] += output_tokens
        if cost:
            slot[3] += cost
        slot[4][bisect_left(_DURATION_BUCKETS, latency)] += 1  # le: value <= bound
        slot[5] += latency

    def failover(self, provider: str, reason: str, tenant: str) -> None:
        key = (provider, reason, tenant) if self.tenant_label else (provider, reason)
        self.failovers[key] = self.failovers.get(key, 0.0) + 1

    def first_token(self, provider: str, seconds: float) -> None:
        slot = self.ttft.get(provider)
        if slot is None:
            slot = self.ttft[provider] = _ttft_slot()
        slot[0] += 1
        slot[1][bisect_left(_TTFT_BUCKETS, seconds)] += 1
        slot[2] += seconds

    def request(
        self, outcome: str, seconds: float, tenant: str, error: BaseException | None
    ) -> None:
        key: tuple[str, ...] = (outcome, tenant) if self.tenant_label else (outcome,)
        slot = self.requests.get(key)
        if slot is None:
            slot = self.requests[key] = _request_slot()
        slot[0] += 1
        slot[1][bisect_left(_DURATION_BUCKETS, seconds)] += 1
        slot[2] += seconds
        if outcome == "quota_exceeded":
            scope, limit = str(getattr(error, "scope", "")), str(getattr(error, "limit", ""))
            key = (scope, limit, tenant) if self.tenant_label else (scope, limit)
            self.quota[key] = self.quota.get(key, 0.0) + 1


def _attempt_slot() -> list[Any]:
    return [0, 0, 0, 0, [0] * (len(_DURATION_BUCKETS) + 1), 0.0]


def _request_slot() -> list[Any]:
    return [0, [0] * (len(_DURATION_BUCKETS) + 1), 0.0]


def _ttft_slot() -> list[Any]:
    return [0, [0] * (len(_TTFT_BUCKETS) + 1), 0.0]


def _add(
    table: dict[tuple[str, ...], _Histogram],
    key: tuple[str, ...],
    bounds: tuple[float, ...],
    n: int,
    buckets: list[int],
    total: float,
) -> None:
    """Add one slot's buckets to the histogram of ``key``."""
    h = table.get(key)
    if h is None:
        h = table[key] = _Histogram(bounds)
    for i, k in enumerate(buckets):
        h.buckets[i] += k
    h.count += n
    h.sum += total


class GatewayMetrics:
    """The llm_gateway metrics of one registry: the routers counting in it, one collector."""

    def __init__(self, registry: CollectorRegistry, *, tenant_label: bool) -> None:
        self.registry = registry
        self.tenant_label = tenant_label
        self._observers: weakref.WeakSet[Observer] = weakref.WeakSet()
        self._retired = Counts(tenant_label)  # what routers that are gone counted
        registry.register(_Collector(self))

    def watch(self, observer: Observer) -> None:
        """Count ``observer``'s router in this registry (until it is garbage, then kept)."""
        self._observers.add(observer)
        assert observer.counts is not None
        weakref.finalize(observer, self._retired.merge, observer.counts)

    def new_counts(self) -> Counts:
        """Counters for one more router."""
        return Counts(self.tenant_label)

    def totals(self) -> Counts:
        total = Counts(self.tenant_label)
        total.merge(self._retired)
        for observer in list(self._observers):
            if observer.counts is not None:
                total.merge(observer.counts)
        return total


# (key of Counts.series / histograms, family, help, labels before the optional ``tenant``)
_COUNTERS = (
    ("requests", "llm_gateway_requests", "Requests by outcome.", "outcome"),
    ("attempts", "llm_gateway_attempts", "Attempts on providers (each is one usage row).",
     "provider model outcome key_source"),
    ("failovers", "llm_gateway_failovers", "Failovers, by the provider failed over from and why.",
     "provider reason"),
    ("tokens", "llm_gateway_tokens", "Tokens of attempts, by direction (input, output).",
     "provider model direction"),
    ("cost", "llm_gateway_cost_usd", "Estimated cost of attempts in USD.", "provider model"),
    ("quota", "llm_gateway_quota_refusals",
     "Requests refused by a budget or rate limit, by scope and limit.", "scope limit"),
)  # fmt: skip
_HISTS = (
    ("request_durations", "llm_gateway_request_duration_seconds",
     "Whole requests, every attempt included (a stream: until its end).", ""),
    ("attempt_durations", "llm_gateway_attempt_duration_seconds",
     "One attempt on one provider.", "provider"),
    ("ttft", "llm_gateway_time_to_first_token_seconds",
     "Streams: from the attempt's start to its first content chunk.", "provider"),
)  # fmt: skip


class _Collector:
    """Builds every family at scrape time: the routers' counters and their live state."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self._metrics))

    def _families(self, metrics: GatewayMetrics | None) -> list[Metric]:
        t: tuple[str, ...] = ("tenant",) if metrics is not None and metrics.tenant_label else ()
        totals = metrics.totals() if metrics is not None else Counts()
        series, hists = totals.series(), totals.histograms()
        out: list[Metric] = []
        for attr, name, doc, labels in _COUNTERS:
            family = CounterMetricFamily(name, doc, labels=(*labels.split(), *t))
            for key, value in sorted(series[attr].items()):
                family.add_metric(list(key), value)
            out.append(family)
        for attr, name, doc, labels in _HISTS:
            hfamily = HistogramMetricFamily(name, doc, labels=labels.split())
            for key, h in sorted(hists[attr].items(), key=lambda kv: kv[0]):
                cumulative, buckets = 0, []
                for bound, n in zip((*h.bounds, float("inf")), h.buckets, strict=True):
                    cumulative += n
                    buckets.append((_le(bound), float(cumulative)))
                hfamily.add_metric(list(key), buckets, h.sum)
            out.append(hfamily)
        out.extend(_state(metrics))
        return out


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _state(metrics: GatewayMetrics | None) -> list[Metric]:
    """Breakers, config cache and usage writer, read from the routers now."""
    breaker = GaugeMetricFamily(
        "llm_gateway_breaker_state",
        "Circuit breaker of each provider key: 0 closed, 1 half-open, 2 open.",
        labels=("provider", "key_fp"),
    )
    cache = CounterMetricFamily(
        "llm_gateway_config_cache",
        "Tenant config lookups: hit, miss (loaded), stale (served, PostgreSQL failing).",
        labels=("event",),
    )
    queue = GaugeMetricFamily(
        "llm_gateway_usage_queue_rows", "Usage rows in memory, not yet written."
    )
    spool = GaugeMetricFamily(
        "llm_gateway_usage_spooled_rows", "Usage rows in spool files awaiting replay."
    )
    written = CounterMetricFamily(
        "llm_gateway_usage_written_rows", "Usage rows written to PostgreSQL."
    )
    rejected = CounterMetricFamily(
        "llm_gateway_usage_rejected_rows",
        "Usage rows PostgreSQL refused (kept in the spool's rejected/).",
    )
    families: list[Metric] = [breaker, cache, queue, spool, written, rejected]
    if metrics is None:
        return families
    counts = {"hit": 0, "miss": 0, "stale": 0}
    queued = spooled = written_rows = rejected_rows = 0
    seen: set[int] = set()
    for observer in list(metrics._observers):
        health, cache_counts, backlog, tracker = observer.state()
        for key in health:
            breaker.add_metric(
                [key["provider"], key["key_fingerprint"]], _BREAKER.get(key["state"], 0.0)
            )
        for event, n in cache_counts.items():
            counts[event] = counts.get(event, 0) + n
        if backlog is not None and id(tracker) not in seen:  # routers may share a tracker
            seen.add(id(tracker))
            queued += backlog.queued
            spooled += backlog.spooled_rows
            written_rows += backlog.written_rows
            rejected_rows += backlog.rejected_rows
    for event, n in counts.items():
        cache.add_metric([event], n)
    queue.add_metric([], queued)
    spool.add_metric([], spooled)
    written.add_metric([], written_rows)
    rejected.add_metric([], rejected_rows)
    return families
