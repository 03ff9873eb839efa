"""What metrics and tracing cost the router per request: CPU with them on against off.

How to run (from the repository root; PostgreSQL reachable through an admin DSN that may
create databases, default ``$DATABASE_URL`` or ``postgresql://postgres@127.0.0.1:5432/postgres``;
needs ``pip install -e '.[metrics,otel]' opentelemetry-sdk``)::

    python bench/bench_observability.py                    # ~2 minutes on an idle 2-core machine
    python bench/bench_observability.py --requests 500 --repeats 3   # quick look

It prints figures and asserts nothing about time. Method (that of ``bench_router.py`` (f)):
each router's provider is a canned one that answers at once with a response recorded from the
simulator and parsed by the router's own parser, so the figure is the router's own CPU: cached
config, chain, attempt loop, usage row (the usage writer runs in this process, and its flush
after each slice is counted), and -- in the variants that have them -- metrics and spans.

Variants, interleaved within each repeat so drift hits them alike:

* ``off``: ``TenantLLMRouter(dsn, providers=...)``, no observer at all.
* ``metrics``: ``metrics=CollectorRegistry()``.
* ``tracing``: ``tracer_provider=`` an SDK ``TracerProvider`` with a ``BatchSpanProcessor``
  whose exporter drops the spans (its thread's CPU is counted: ``time.process_time()`` is the
  whole process; the processor is flushed at the end of each slice).
* ``unsampled``: tracing with a provider whose sampler drops every span (``ALWAYS_OFF``):
  the SDK's ``start_span`` for a dropped span and the gateway's own hooks and ``traceparent``.
* ``both``: metrics and tracing.
* ``both-10%``: metrics and tracing with ``ParentBased(TraceIdRatioBased(0.1))``: a tenth of
  the requests recorded, as a sampling service runs it.
* ``sdk-around``: ``off``, with two bare recorded SDK spans (those of ``sdk-floor``) made
  around each request by this script, not by the router: what the SDK's spans cost among the
  router's and the HTTP client's work, whose caches they share. ``tracing`` minus
  ``sdk-around`` is the gateway's own part of tracing.
* ``sdk-floor`` (canned part only): no router; two bare recorded SDK spans per iteration with
  the attributes the router's carry, same processor and exporter: the SDK alone in a tight
  loop (warm caches: a lower bound of what the same spans cost inside a request).

CPU per request = ``time.process_time()`` of the slice (requests + usage flush + span flush)
/ requests, at concurrency 1. Each figure is the median over ``--repeats`` runs; the spread is
min..max over them. The added cost of a variant is paired: variant minus ``off`` of the same
repeat (run back to back), median (min..max) over repeats -- steadier than the difference of
two medians on a shared machine. Last table (with the HTTP part): the canned path's paired
added us as a share of a whole request over HTTP (the HTTP ``off`` median): the gateway adds
the same work whatever the provider, and the canned path measures it without the HTTP noise.
For load-independent figures see ``bench_observability_callgrind.py`` (instruction counts).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # bench/ is not a package: found through sys.path
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from prometheus_client import CollectorRegistry

from llm_gateway.keys import ApiKey
from llm_gateway.migrate import apply_migrations
from llm_gateway.providers import ProviderResponse, provider_settings
from llm_gateway.providers.base import parse_completion
from llm_gateway.router import TenantLLMRouter
from llm_gateway.simulator import SimulatedProvider

DB_NAME = "llmgw_bench_observability"
MODEL = "gpt-4o-mini"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello in one sentence."}]
VARIANTS = ("off", "metrics", "unsampled", "tracing", "both", "both-10%", "sdk-around")
VERSIONS = ("prometheus-client", "opentelemetry-api", "opentelemetry-sdk", "asyncpg")


class CannedProvider:
    """Answers at once with a recorded response, parsed by the router's own parser."""

    def __init__(self, name: str, body: bytes, headers: Any) -> None:
        self.name = name
        self._body = body
        self._headers = headers
        self.traced = 0  # requests that carried a traceparent (the variant really traces)

    async def complete(
        self,
        *,
        key: ApiKey | None,
        model: str,
        messages: Sequence[Any],
        params: Any,
        timeout: float,
        extra_headers: Any = None,
    ) -> ProviderResponse:
        if extra_headers and "traceparent" in extra_headers:
            self.traced += 1
        return parse_completion(self.name, model, self._body, self._headers)

    async def aclose(self) -> None:
        return None


class DropExporter(SpanExporter):
    """Exports nowhere: what is measured is making and ending spans, not shipping them."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Any) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


_REQUEST_START: dict[str, Any] = {
    "gen_ai.operation.name": "chat",
    "llm_gateway.tenant": "7b0e7f5c-3a52-4d39-9d5a-0c1f6a8e2b11",
    "llm_gateway.stream": False,
    "llm_gateway.request_id": "0c1f6a8e-2b11-4d39-9d5a-7b0e7f5c3a52",
}
_ATTEMPT_START: dict[str, Any] = {
    "gen_ai.operation.name": "chat",
    "gen_ai.system": "llm7",
    "gen_ai.request.model": MODEL,
    "llm_gateway.attempt": 1,
    "llm_gateway.key_source": "system",
}
_ATTEMPT_END: dict[str, Any] = {
    "llm_gateway.outcome": "success",
    "gen_ai.response.model": MODEL,
    "gen_ai.usage.input_tokens": 12,
    "llm_gateway.cost_usd": 0.0001,
}
_REQUEST_END: dict[str, Any] = {
    "llm_gateway.outcome": "success",
    "gen_ai.system": "llm7",
    "gen_ai.response.model": MODEL,
    "llm_gateway.attempts": 1,
    "gen_ai.usage.input_tokens": 12,
}


class SdkFloor:
    """Two bare SDK spans per iteration, the shape of a request's (no router, no gateway
    code): what the OpenTelemetry SDK itself costs, with the same processor and exporter.
    ``sampled=False``: one span the sampler drops (``ALWAYS_OFF``), all a dropped request
    makes."""

    def __init__(self, *, sampled: bool = True) -> None:
        self.exporter = DropExporter()
        self.sampled = sampled
        self.tracer_provider = TracerProvider(sampler=None if sampled else ALWAYS_OFF)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self._tracer = self.tracer_provider.get_tracer("bench")

    async def run(self, n: int) -> float:
        """CPU seconds per iteration of ``n`` iterations, the span flush included."""
        gc.collect()
        cpu = time.process_time()
        await self.spans(n)
        return (time.process_time() - cpu) / n

    async def spans(self, n: int) -> None:
        """``n`` iterations, then the span flush."""
        tracer = self._tracer
        if not self.sampled:
            for _ in range(n):
                tracer.start_span("llm_gateway.chat", attributes=_REQUEST_START).end()
            return
        for i in range(n):
            parent, child = self._start()
            _end(parent, child, i)
        self.tracer_provider.force_flush()

    async def around(self, n: int, call: Callable[[], Awaitable[Any]]) -> None:
        """Await ``call()`` ``n`` times, each inside the two spans of :meth:`spans` (made
        here, not by the router: ``sdk-around``)."""
        for i in range(n):
            parent, child = self._start()
            await call()
            _end(parent, child, i)

    def _start(self) -> tuple[Any, Any]:
        """A request's span and its attempt's, with the attributes the router's carry at
        their start."""
        parent = self._tracer.start_span("llm_gateway.chat", attributes=_REQUEST_START)
        child = self._tracer.start_span(
            "chat m",
            context=trace.set_span_in_context(parent),
            kind=trace.SpanKind.CLIENT,
            attributes=_ATTEMPT_START,
        )
        return parent, child

    def close(self) -> None:
        self.tracer_provider.shutdown()


def _end(parent: Any, child: Any, i: int) -> None:
    """End the spans of :meth:`SdkFloor._start` with the attributes of the router's ends."""
    child.set_attributes({**_ATTEMPT_END, "gen_ai.usage.output_tokens": i})
    child.end()
    parent.set_attributes({**_REQUEST_END, "gen_ai.usage.output_tokens": i})
    parent.end()


async def recorded_answer() -> tuple[bytes, Any]:
    async with SimulatedProvider(name="llm7") as sim, httpx2.AsyncClient() as client:
        response = await client.post(
            f"{sim.base_url}/chat/completions",
            content=orjson.dumps({"model": MODEL, "messages": MESSAGES}),
            headers={"authorization": "Bearer k", "content-type": "application/json"},
        )
    return response.content, response.headers


async def seed(dsn: str) -> uuid.UUID:
    await apply_migrations(dsn)
    tid = uuid.uuid4()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO tenants (id, name, llm_tokens, inference_config)"
            " VALUES ($1, 'bench', '{}', '{\"preferred_provider\": \"llm7\"}')",
            tid,
        )
    finally:
        await conn.close()
    return tid


class Variant:
    def __init__(self, name: str, router: TenantLLMRouter, provider: CannedProvider) -> None:
        self.name = name
        self.router = router
        self.provider = provider
        self.tracer_provider: TracerProvider | None = None
        self.exporter: DropExporter | None = None
        self.registry: CollectorRegistry | None = None
        self.floor: SdkFloor | None = None  # sdk-around: the spans this script makes


async def make(
    name: str, dsn: str, answer: tuple[bytes, Any], base_url: str | None = None
) -> Variant:
    """A started router of variant ``name``: canned provider, or the simulator at ``base_url``."""
    options: dict[str, Any] = {}
    registry = tracer_provider = exporter = None
    if name in ("metrics", "both", "both-10%"):
        registry = options["metrics"] = CollectorRegistry()
    if name in ("tracing", "both", "unsampled", "both-10%"):
        exporter = DropExporter()
        sampler: Any = ALWAYS_OFF if name == "unsampled" else None
        if name == "both-10%":  # what a sampling service runs: a tenth of the traces recorded
            sampler = ParentBased(TraceIdRatioBased(0.1))
        tracer_provider = TracerProvider(sampler=sampler)
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        options["tracer_provider"] = tracer_provider
    settings = provider_settings("llm7", base_url or "http://127.0.0.1:9/v1", api_key="bench-key")
    router = TenantLLMRouter(dsn, providers={"llm7": settings}, **options)
    canned = CannedProvider("llm7", *answer)
    if base_url is None:
        real = router._providers["llm7"]
        router._providers["llm7"] = canned  # type: ignore[assignment]
        await real.aclose()
    await router.start()
    v = Variant(name, router, canned)
    v.registry, v.tracer_provider, v.exporter = registry, tracer_provider, exporter
    if name == "sdk-around":
        v.floor = SdkFloor()
        v.tracer_provider, v.exporter = v.floor.tracer_provider, v.floor.exporter
    return v


async def slice_cpu(v: Variant, tenant: uuid.UUID, n: int) -> float:
    """CPU seconds per request of ``n`` sequential requests, flushes included."""
    gc.collect()
    cpu = time.process_time()
    await requests(v, tenant, n)
    return (time.process_time() - cpu) / n


async def requests(v: Variant, tenant: uuid.UUID, n: int) -> None:
    """``n`` sequential requests, then the usage flush and the span flush."""
    complete = v.router.complete_for_tenant
    if v.floor is not None:
        await v.floor.around(n, lambda: complete(tenant, MESSAGES))
    else:
        for _ in range(n):
            await complete(tenant, MESSAGES)
    tracker = v.router.usage_tracker
    assert tracker is not None
    await tracker.flush(timeout=30)
    if v.tracer_provider is not None:
        v.tracer_provider.force_flush()


async def amain(args: argparse.Namespace) -> None:
    pin = _common.pin_self(0) if _common.can_pin(0) else "not pinned"
    print("llm-gateway observability overhead benchmark")
    print(_common.environment(VERSIONS))
    print(f"pinning: this process {pin}")
    answer = await recorded_answer()
    spool = tempfile.mkdtemp(prefix="llmgw-bench-spool-")
    os.environ["LLM_GATEWAY_SPOOL_DIR"] = spool
    async with _common.scratch_database(args.dsn, DB_NAME, keep=args.keep_db) as dsn:
        tenant = await seed(dsn)
        canned = await measure(
            args,
            "canned provider",
            [await make(n, dsn, answer) for n in VARIANTS],
            tenant,
            SdkFloor(),
        )
        if not args.skip_http:
            with _common.simulator("llm7", cpu=1) as sim:
                variants = [await make(n, dsn, answer, sim.base_url) for n in VARIANTS]
                http = await measure(
                    args, f"over HTTP to the simulator ({sim.base_url})", variants, tenant
                )
            whole_request(canned, http)
    print(f"\n{_common.load_average()}")


def whole_request(canned: dict[str, list[float]], http: dict[str, list[float]]) -> None:
    """The canned path's added CPU as a share of a whole request over HTTP (see the module)."""
    off = statistics.median(http["off"])
    rows = []
    for name in VARIANTS[1:]:
        added = paired(canned, name)
        over_http = paired(http, name)
        rows.append(
            (
                name,
                f"{statistics.median(added):+.1f} ({min(added):+.1f}..{max(added):+.1f})",
                f"{statistics.median(added) / off * 100:+.1f} %",
                f"{statistics.median(over_http) / off * 100:+.1f} %"
                f" ({min(over_http) / off * 100:+.1f}..{max(over_http) / off * 100:+.1f})",
            )
        )
    _common.print_table(
        f"Share of a whole request over HTTP (off: median {off:,.0f} us of client CPU)",
        ("variant", "added us (canned, paired)", "of a request", "HTTP paired delta"),
        rows,
        note="'of a request': the canned path's paired median added us / the HTTP off median;"
        " 'HTTP paired delta': the same measured over HTTP (noisier).",
    )


def paired(figures: dict[str, list[float]], name: str) -> list[float]:
    """``name`` minus ``off``, repeat by repeat (both ran in the same repeat, back to back)."""
    return [x - o for x, o in zip(figures[name], figures["off"], strict=True)]


async def measure(
    args: argparse.Namespace,
    what: str,
    variants: list[Variant],
    tenant: uuid.UUID,
    floor: SdkFloor | None = None,
) -> dict[str, list[float]]:
    """Interleaved slices of every variant (and of the SDK floor); prints the table, closes
    the routers, returns the figures (us per request, one per repeat)."""
    try:
        for v in variants:  # warm-up: config cached, pools open, counters made
            await slice_cpu(v, tenant, min(200, args.requests))
        if floor is not None:
            await floor.run(min(200, args.requests))
        figures: dict[str, list[float]] = {v.name: [] for v in variants}
        if floor is not None:
            figures["sdk-floor"] = []
        for r in range(args.repeats):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                figures[v.name].append(await slice_cpu(v, tenant, args.requests) * 1e6)
            if floor is not None:
                figures["sdk-floor"].append(await floor.run(args.requests) * 1e6)
        base = statistics.median(figures["off"])
        rows = []
        for name, xs in figures.items():
            med = statistics.median(xs)
            if name in ("off", "sdk-floor"):
                rows.append((name, f"{med:.1f}", f"{min(xs):.1f}..{max(xs):.1f}", "", ""))
                continue
            added = paired(figures, name)
            mid = statistics.median(added)
            rows.append(
                (
                    name,
                    f"{med:.1f}",
                    f"{min(xs):.1f}..{max(xs):.1f}",
                    f"{mid:+.1f} ({min(added):+.1f}..{max(added):+.1f})",
                    f"{mid / base * 100:+.1f} %",
                )
            )
        _common.print_table(
            f"CPU per request, {what}, concurrency 1 ({args.requests} requests x"
            f" {args.repeats} repeats, usage rows written)",
            ("variant", "median us", "spread (min..max)", "added us, paired (min..max)", "vs off"),
            rows,
            note="added us: variant minus off in the same repeat; median (min..max) over"
            " repeats; 'vs off': that median / the off median."
            + ("\nsdk-floor: two bare SDK spans per iteration, no router." if floor else ""),
        )
        for v in variants:
            if v.exporter is not None:
                print(f"{v.name}: {v.exporter.spans} spans exported")
            if v.name != "off" and v.provider.traced:
                print(f"{v.name}: {v.provider.traced} canned requests carried a traceparent")
        return figures
    finally:
        for v in variants:
            await v.router.close()
            if v.tracer_provider is not None:
                v.tracer_provider.shutdown()
        if floor is not None:
            floor.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dsn", default=_common.DEFAULT_ADMIN_DSN, help="admin DSN")
    parser.add_argument("--requests", type=int, default=2000, help="requests per slice")
    parser.add_argument("--repeats", type=int, default=7, help="slices per variant (median)")
    parser.add_argument("--skip-http", action="store_true", help="canned provider only")
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database")
    asyncio.run(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
