"""What the router costs per request, next to the bare SDKs, against a simulated provider.

How to run (from the repository root; PostgreSQL reachable through an admin DSN that may
create databases, default ``$DATABASE_URL`` or ``postgresql://postgres@127.0.0.1:5432/postgres``)::

    python bench/bench_router.py                     # ~4.5 minutes on an idle 2-core machine
    python bench/bench_router.py --requests 500 --repeats 1 --skip-profile   # quick look
    python bench/bench_router.py --dsn postgresql://postgres@db:5432/postgres

It prints figures and asserts nothing about time. Setup:

* The simulated provider (``python -m llm_gateway.simulator``) runs in child processes pinned
  to CPU 1; this (client) process pins itself to CPU 0. On a machine with one CPU nothing is
  pinned and the report says so.
* Database ``llmgw_bench_router`` is created (a leftover one is dropped), migrated, given the
  tenants below, and dropped at the end (``--keep-db`` keeps it). Usage spool files go to a
  temporary folder, never to the user's spool.
* The router is built with ``TenantLLMRouter(dsn, providers={...})`` and warmed: the tenant's
  config is cached and the connection pool is open before anything is timed. Usage recording
  is on, as in production: the usage writer runs in this process and its CPU is counted.

Parts:

1. Non-streamed completions at concurrency 1 and 64 (``--concurrency``): the bare openai SDK
   (pydantic-parsed and raw + orjson), the bare groq SDK, bare ``httpx2`` / ``httpx`` POSTs
   with orjson, openai over aiohttp (only if ``aiohttp`` is installed), and
   ``router.complete_for_tenant``. Per request: client CPU (``time.process_time()`` of the
   whole process / N, so it includes the event loop and, for the router, the usage writer; the
   router's run ends with ``tracker.flush()`` and that CPU is counted too), p50/p99 latency
   and throughput.
2. Failover: a tenant whose preferred provider refuses connections and one whose preferred
   provider accepts and never answers (router built with ``attempt_timeout=1.0``), each with a
   healthy second provider. Time to answer of the first request, of requests 2..5 (breaker
   still closed), and the median of requests 6..25 (the breaker opens after 5 consecutive
   failures and stays open 30 s). A fresh router (fresh health state) per repeat.
3. Streaming at concurrency 1: time to the first content chunk and to the end, and CPU per
   streamed request read to the end: the bare openai SDK (``stream=True``, usage requested)
   vs ``router.stream_for_tenant``.
4. A cProfile of ~1,000 router requests at concurrency 1: the top functions of our packages
   (``llm_gateway``, ``usage``) by cumulative and by own time, in µs per request (cProfile
   inflates every figure, roughly 2x; compare them with each other, not with part 1).

Every figure of parts 1-3 is the median over ``--repeats`` runs (variants interleaved within
each repeat, so drift hits them alike); each run is preceded by an untimed warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import importlib.util
import os
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import groq
import httpx
import httpx2
import openai
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # bench/ is not a package: found through sys.path

from llm_gateway.health import HealthRegistry
from llm_gateway.keys import ApiKey
from llm_gateway.migrate import apply_migrations
from llm_gateway.providers import ProviderResponse, ProviderSettings, provider_settings
from llm_gateway.providers.base import parse_completion
from llm_gateway.router import TenantLLMRouter

DB_NAME = "llmgw_bench_router"
MODEL = "gpt-4o-mini"
KEY = "bench-key"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello in one sentence."}]
AUTH = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
BODY = orjson.dumps({"model": MODEL, "messages": MESSAGES})
BODY_STREAM = orjson.dumps(
    {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)
DEFAULT_VARIANTS = "a,b,b2,c,d1,d2,e,f,f0"  # (a), (b), (f) and (f0) always run
VERSIONS = ("openai", "groq", "httpx", "httpx2", "orjson", "pydantic", "asyncpg", "aiohttp")

# The returned value of a timed call: a time to first token in seconds (streams), or None.
Call = Callable[[], Awaitable[float | None]]


# --- measuring -----------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    """Raw figures of one timed slice of requests."""

    n: int
    cpu_s: float  # whole process, flush included
    flush_s: float
    wall_s: float  # requests only (not the flush)
    connects: int
    latencies: list[float]
    ttfts: list[float]


@dataclass(slots=True)
class Run:
    """One run of N requests (possibly timed in slices), summarised."""

    cpu_us: float  # client CPU per request, flush included
    flush_us: float  # of which: CPU of the post-run usage flush, per request
    p50_ms: float
    p99_ms: float
    rps: float
    ttft_p50_ms: float = float("nan")
    ttft_p99_ms: float = float("nan")
    connects_per_1k: float = 0.0  # TCP connections opened per 1,000 requests

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> Run:
        n = sum(x.n for x in samples)
        latencies = [t for x in samples for t in x.latencies]
        ttfts = [t for x in samples for t in x.ttfts]
        return cls(
            cpu_us=sum(x.cpu_s for x in samples) / n * 1e6,
            flush_us=sum(x.flush_s for x in samples) / n * 1e6,
            p50_ms=_common.percentile(latencies, 0.50) * 1e3,
            p99_ms=_common.percentile(latencies, 0.99) * 1e3,
            rps=n / sum(x.wall_s for x in samples),
            ttft_p50_ms=_common.percentile(ttfts, 0.50) * 1e3 if ttfts else float("nan"),
            ttft_p99_ms=_common.percentile(ttfts, 0.99) * 1e3 if ttfts else float("nan"),
            connects_per_1k=sum(x.connects for x in samples) * 1000 / n,
        )


class ConnectionCounter:
    """Counts TCP connections this process opens (every HTTP client here goes through
    ``loop.create_connection``; the shadowing attribute is on the running loop only)."""

    def __init__(self) -> None:
        self.count = 0

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        original = loop.create_connection

        async def counting(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await original(*args, **kwargs)

        loop.create_connection = counting  # type: ignore[method-assign]


CONNECTIONS = ConnectionCounter()


@dataclass(slots=True)
class Variant:
    key: str
    label: str
    call: Call | None  # None: not available (reason in `missing`)
    after: Callable[[], Awaitable[object]] | None = None  # counted in CPU, not in latency
    missing: str = ""
    runs: dict[int, list[Run]] = field(default_factory=dict)  # concurrency -> runs

    def median(self, concurrency: int) -> Run | None:
        runs = self.runs.get(concurrency)
        if not runs:
            return None

        def med(attr: str) -> float:
            return float(statistics.median(getattr(r, attr) for r in runs))

        return Run(
            med("cpu_us"),
            med("flush_us"),
            med("p50_ms"),
            med("p99_ms"),
            med("rps"),
            med("ttft_p50_ms"),
            med("ttft_p99_ms"),
            med("connects_per_1k"),
        )

    def cpu_range(self, concurrency: int) -> str:
        """Lowest and highest CPU µs/req of the repeats: how noisy the median is."""
        runs = self.runs.get(concurrency)
        if not runs:
            return ""
        return f"{min(r.cpu_us for r in runs):,.0f}-{max(r.cpu_us for r in runs):,.0f}"


async def timed_sample(
    call: Call,
    n: int,
    concurrency: int,
    after: Callable[[], Awaitable[object]] | None = None,
    *,
    collect: bool = True,
) -> Sample:
    """N requests by ``concurrency`` workers; CPU of the whole process, latency per request.

    ``after`` (the usage flush) runs once the requests are done: its CPU is counted, its time
    is not in the latencies. ``collect``: ``gc.collect()`` first (untimed), so no slice pays
    for the previous one's garbage.
    """
    latencies: list[float] = []
    ttfts: list[float] = []
    left = n
    perf = time.perf_counter

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = perf()
            ttft = await call()
            latencies.append(perf() - t0)
            if ttft is not None:
                ttfts.append(ttft)

    if collect:
        gc.collect()
    connects = CONNECTIONS.count
    cpu0, wall0 = time.process_time(), perf()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = perf() - wall0
    cpu1 = time.process_time()
    connects = CONNECTIONS.count - connects
    if after is not None:
        await after()
    cpu2 = time.process_time()
    return Sample(n, cpu2 - cpu0, cpu2 - cpu1, wall, connects, latencies, ttfts)


async def timed_run(
    call: Call,
    n: int,
    concurrency: int,
    after: Callable[[], Awaitable[object]] | None = None,
    *,
    collect: bool = True,
) -> Run:
    """One unsliced run (warm-ups, profiles)."""
    return Run.of([await timed_sample(call, n, concurrency, after, collect=collect)])


async def run_variants(
    variants: Sequence[Variant],
    n: int,
    concurrencies: Sequence[int],
    repeats: int,
    slices: int,
) -> None:
    """Each repeat times N requests per (concurrency, variant), in ``slices`` slices taken
    round-robin across the variants, so that a change of load on the machine hits every
    variant alike; each slice follows a short untimed warm-up at the same concurrency."""
    live = [v for v in variants if v.call is not None]
    size = max(1, n // slices)
    for rep in range(repeats):
        for c in concurrencies:
            samples: dict[str, list[Sample]] = {v.key: [] for v in live}
            for i in range(slices):
                count = size if i < slices - 1 else n - size * (slices - 1)
                for v in live:
                    assert v.call is not None
                    await timed_run(v.call, max(20, c), c, v.after)  # pool, caches warm
                    samples[v.key].append(await timed_sample(v.call, count, c, v.after))
            for v in live:
                run = Run.of(samples[v.key])
                v.runs.setdefault(c, []).append(run)
                print(
                    f"  repeat {rep + 1}/{repeats}  c={c:<3} {v.key:<3} {run.cpu_us:8.0f} µs/req"
                    f"  p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms  {run.rps:6.0f} req/s",
                    flush=True,
                )


def fmt(value: float, digits: int = 0) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"  # NaN -> "-"


# --- database and router -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tenants:
    healthy: uuid.UUID  # llm7 preferred (the simulator)
    dead_primary: uuid.UUID  # openai preferred (connection refused), then llm7
    hang_primary: uuid.UUID  # openrouter preferred (accepts, never answers), then llm7


async def seed(dsn: str) -> Tenants:
    await apply_migrations(dsn)
    t = Tenants(uuid.uuid4(), uuid.uuid4(), uuid.uuid4())
    rows = [
        (t.healthy, {"llm7": KEY}, {"preferred_provider": "llm7"}),
        (
            t.dead_primary,
            {"openai": KEY, "llm7": KEY},
            {"preferred_provider": "openai", "fallback_order": ["llm7"]},
        ),
        (
            t.hang_primary,
            {"openrouter": KEY, "llm7": KEY},
            {"preferred_provider": "openrouter", "fallback_order": ["llm7"]},
        ),
    ]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            "INSERT INTO tenants (id, name, llm_tokens, inference_config)"
            " VALUES ($1, 'bench', $2::jsonb, $3::jsonb)",
            [(tid, orjson.dumps(k).decode(), orjson.dumps(c).decode()) for tid, k, c in rows],
        )
    finally:
        await conn.close()
    return t


def tracker_flush(router: TenantLLMRouter) -> Callable[[], Awaitable[object]]:
    async def flush() -> object:
        tracker = router.usage_tracker
        return None if tracker is None else await tracker.flush(timeout=30)

    return flush


class CannedProvider:
    """Stands in for a router's Provider: answers at once with a recorded simulator response.

    ``complete`` parses the recorded body with the router's own ``parse_completion``, so a
    router using it pays for everything except HTTP and the SDK.
    """

    def __init__(self, name: str, body: bytes, headers: httpx2.Headers) -> None:
        self.name = name
        self._body = body
        self._headers = headers

    async def complete(
        self,
        *,
        key: ApiKey | None,
        model: str,
        messages: Sequence[Any],
        params: Any,
        timeout: float,
    ) -> ProviderResponse:
        return parse_completion(self.name, model, self._body, self._headers)

    async def aclose(self) -> None:
        return None


async def canned_router(
    dsn: str, settings: ProviderSettings, sim: _common.SimProcess
) -> TenantLLMRouter | None:
    """A router whose provider is a :class:`CannedProvider`; ``None`` if its layout changed."""
    async with httpx2.AsyncClient() as client:
        answer = await client.post(f"{sim.base_url}/chat/completions", content=BODY, headers=AUTH)
    router = TenantLLMRouter(dsn, providers={settings.name: settings})
    providers = getattr(router, "_providers", None)
    if not isinstance(providers, dict) or settings.name not in providers:
        return None
    real = providers[settings.name]
    providers[settings.name] = CannedProvider(settings.name, answer.content, answer.headers)
    await real.aclose()
    return router


# --- part 1: non-streamed ------------------------------------------------------------------


def openai_calls(client: openai.AsyncOpenAI) -> dict[str, Call]:
    """The openai SDK's non-streamed call, four ways."""
    create = client.chat.completions.create
    raw_create = client.chat.completions.with_raw_response.create
    post = client.post
    auth = {"Authorization": f"Bearer {KEY}"}

    async def parsed() -> None:
        await create(model=MODEL, messages=MESSAGES)

    async def raw() -> None:
        response = await raw_create(model=MODEL, messages=MESSAGES)
        orjson.loads(response.http_response.content)

    async def raw_as_router() -> None:
        # What llm_gateway.providers.base.Provider.complete sends: the tenant's key as a
        # per-request header and a per-request timeout.
        response = await raw_create(
            model=MODEL, messages=MESSAGES, extra_headers=auth, timeout=60.0
        )
        orjson.loads(response.http_response.content)

    async def low_level() -> None:
        # The SDK's own HTTP layer (auth, headers, errors) without its parameter transform
        # and JSON encoding: the body is encoded by orjson, the response read as bytes.
        response = await post(
            "/chat/completions",
            cast_to=httpx2.Response,
            content=BODY,
            options={"headers": {**auth, "Content-Type": "application/json"}, "timeout": 60.0},
        )
        orjson.loads(response.content)

    return {"a": parsed, "b": raw, "b1": raw_as_router, "b2": low_level}


def post_call(client: httpx.AsyncClient | httpx2.AsyncClient, url: str) -> Call:
    async def post() -> None:
        response = await client.post(url, content=BODY, headers=AUTH)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")
        orjson.loads(response.content)

    return post


async def part1(
    sim: _common.SimProcess,
    router: TenantLLMRouter,
    canned: TenantLLMRouter | None,
    tenant: uuid.UUID,
    args: argparse.Namespace,
    stack: contextlib.AsyncExitStack,
) -> None:
    url = sim.base_url
    oa = openai.AsyncOpenAI(api_key=KEY, base_url=url, max_retries=0)
    stack.push_async_callback(oa.close)
    oa_calls = openai_calls(oa)
    gq = groq.AsyncGroq(api_key=KEY, base_url=sim.root_url, max_retries=0)
    stack.push_async_callback(gq.close)
    gq_create = gq.chat.completions.create

    async def groq_call() -> None:
        await gq_create(model=MODEL, messages=MESSAGES)

    h2 = httpx2.AsyncClient()
    stack.push_async_callback(h2.aclose)
    h1 = httpx.AsyncClient()
    stack.push_async_callback(h1.aclose)
    chat_url = f"{url}/chat/completions"

    aio: Call | None = None
    aio_missing = ""
    if importlib.util.find_spec("aiohttp") is None:
        aio_missing = "not installed (extra openai[aiohttp]; not installed by this bench)"
    else:  # pragma: no cover - aiohttp is absent on the reference machine
        oa_aio = openai.AsyncOpenAI(
            api_key=KEY, base_url=url, max_retries=0, http_client=openai.DefaultAioHttpClient()
        )
        stack.push_async_callback(oa_aio.close)
        aio = openai_calls(oa_aio)["a"]

    async def routed() -> None:
        await router.complete_for_tenant(tenant, MESSAGES)

    async def routed_canned() -> None:
        assert canned is not None
        await canned.complete_for_tenant(tenant, MESSAGES)

    variants = [
        Variant("a", "openai SDK, create() (pydantic)", oa_calls["a"]),
        Variant("b", "openai SDK, with_raw_response + orjson", oa_calls["b"]),
        Variant("b1", "(b) + per-request auth header, timeout", oa_calls["b1"]),
        Variant("b2", "openai SDK, client.post(orjson bytes)", oa_calls["b2"]),
        Variant("c", "groq SDK, create()", groq_call),
        Variant("d1", "httpx2.AsyncClient POST + orjson", post_call(h2, chat_url)),
        Variant("d2", "httpx.AsyncClient POST + orjson", post_call(h1, chat_url)),
        Variant("e", "openai SDK over aiohttp", aio, missing=aio_missing),
        Variant("f", "router.complete_for_tenant", routed, after=tracker_flush(router)),
        Variant(
            "f0",
            "(f) with a canned provider: no HTTP, no SDK",
            routed_canned if canned is not None else None,
            after=tracker_flush(canned) if canned is not None else None,
            missing="" if canned is not None else "the router's provider table was not found",
        ),
    ]
    wanted = set(args.variants.split(","))
    variants = [v for v in variants if v.key in wanted or v.key in ("a", "b", "f", "f0")]
    print(f"\nPart 1: non-streamed, {args.requests} requests per run, {args.repeats} repeats")
    await run_variants(variants, args.requests, args.concurrency, args.repeats, args.slices)

    for c in args.concurrency:
        base = variants[0].median(c)
        rows: list[list[object]] = []
        for v in variants:
            m = v.median(c)
            if m is None:
                rows.append([f"({v.key}) {v.label}", "n/a", "", "", "", "", "", "", ""])
                continue
            ratio = "" if base is None else f"{m.cpu_us / base.cpu_us:.2f}x"
            rows.append(
                [
                    f"({v.key}) {v.label}",
                    fmt(m.cpu_us),
                    v.cpu_range(c),
                    fmt(m.flush_us) if v.after is not None else "",
                    fmt(m.p50_ms, 2),
                    fmt(m.p99_ms, 2),
                    fmt(m.rps),
                    fmt(m.connects_per_1k, 1),
                    ratio,
                ]
            )
        _common.print_table(
            f"Part 1 - non-streamed, concurrency {c} (medians of {args.repeats} runs"
            f" of {args.requests} requests)",
            [
                "variant",
                "CPU µs/req",
                "CPU range",
                "of which flush",
                "p50 ms",
                "p99 ms",
                "req/s",
                "conns/1k req",
                "CPU vs (a)",
            ],
            rows,
            note="CPU = whole client process (event loop, SDK, router, usage writer) / requests;"
            " CPU range = lowest-highest of the repeats;"
            " 'of which flush' = the usage writer's tracker.flush() after the run;"
            "\nconns/1k req = new TCP connections opened per 1,000 requests (0: all kept alive)."
            "\n(f0) is the router's own cost: tenant config, chain, health, parse_completion,"
            " usage row and its write (the provider answers with a recorded body)."
            + "".join(f"\n({v.key}) {v.missing}" for v in variants if v.missing),
        )
    by_key = {v.key: v for v in variants}
    refs = [k for k in ("a", "b", "b1", "b2") if k in by_key and by_key[k].runs]
    rows = []
    for c in args.concurrency:
        f_m, f0_m = by_key["f"].median(c), by_key["f0"].median(c)
        ref_m = {k: by_key[k].median(c) for k in refs}
        if f_m is None:
            continue
        row: list[object] = [f"concurrency {c}"]
        for k in refs:
            m = ref_m[k]
            row.append("-" if m is None else fmt(f_m.cpu_us - m.cpu_us))
        row.append("-" if f0_m is None else fmt(f0_m.cpu_us))
        for k in ("a", "b"):
            m = ref_m.get(k)
            row.append("-" if m is None else f"{f_m.cpu_us / m.cpu_us:.2f}x")
        rows.append(row)
    _common.print_table(
        "Part 1 - the router's extra CPU per request (medians; differences of medians)",
        [""] + [f"router - ({k}) µs" for k in refs] + ["(f0) µs", "router / (a)", "router / (b)"],
        rows,
        note="The router calls its provider like (b2) plus a per-request key header and"
        " timeout: router - (b2) is\nwhat routing, tenancy and usage accounting add on top of"
        " the SDK call, as a difference of two noisy medians; (f0)\nmeasures the same thing"
        " directly, without HTTP. Negative: cheaper (within the noise of the CPU ranges).",
    )


# --- part 2: failover ----------------------------------------------------------------------


@dataclass(slots=True)
class FailoverRun:
    first_ms: float
    closed_ms: float  # requests 2..5: the breaker still closed
    open_ms: float  # requests 6..25: the breaker open
    open_cpu_us: float
    attempts_first: int
    attempts_open: int


async def failover_series(router: TenantLLMRouter, tenant: uuid.UUID, n: int) -> FailoverRun:
    times: list[float] = []
    cpus: list[float] = []
    attempts: list[int] = []
    for _ in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        result = await router.complete_for_tenant(tenant, MESSAGES)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        attempts.append(len(result.attempts))
    return FailoverRun(
        first_ms=times[0] * 1e3,
        closed_ms=statistics.median(times[1:5]) * 1e3,
        open_ms=statistics.median(times[5:]) * 1e3,
        open_cpu_us=statistics.median(cpus[5:]) * 1e6,
        attempts_first=attempts[0],
        attempts_open=attempts[-1],
    )


async def part2(
    dsn: str,
    settings: dict[str, ProviderSettings],
    tenants: Tenants,
    args: argparse.Namespace,
) -> None:
    n = 25
    dead: list[FailoverRun] = []
    hang: list[FailoverRun] = []
    healthy: list[float] = []
    print(f"\nPart 2: failover, {n} sequential requests per scenario, {args.repeats} repeats")
    for rep in range(args.repeats):
        router = TenantLLMRouter(
            dsn, providers=settings, attempt_timeout=1.0, health=HealthRegistry()
        )
        async with router:
            # Warm: configs cached, the healthy provider's pool open; health stays empty
            # for the failing providers.
            for tid in (tenants.dead_primary, tenants.hang_primary):
                await router.tenant_config(tid)
            for _ in range(20):
                await router.complete_for_tenant(tenants.healthy, MESSAGES)
            ref = await failover_series(router, tenants.healthy, n)
            healthy.append(ref.open_ms)
            dead.append(await failover_series(router, tenants.dead_primary, n))
            hang.append(await failover_series(router, tenants.hang_primary, n))
        print(
            f"  repeat {rep + 1}/{args.repeats}: dead first {dead[-1].first_ms:.1f} ms,"
            f" open {dead[-1].open_ms:.2f} ms; hang first {hang[-1].first_ms:.0f} ms,"
            f" open {hang[-1].open_ms:.2f} ms",
            flush=True,
        )

    def row(label: str, runs: list[FailoverRun]) -> list[object]:
        def med(attr: str) -> float:
            return float(statistics.median(getattr(r, attr) for r in runs))

        return [
            label,
            fmt(med("first_ms"), 1),
            fmt(med("closed_ms"), 1),
            fmt(med("open_ms"), 2),
            fmt(med("open_cpu_us")),
            f"{runs[0].attempts_first} / {runs[0].attempts_open}",
        ]

    _common.print_table(
        f"Part 2 - failover, time to answer (medians of {args.repeats} runs, fresh health each)",
        [
            "preferred provider",
            "request 1 ms",
            "requests 2-5 ms",
            "requests 6-25 ms",
            "CPU µs/req (6-25)",
            "attempts 1st / 25th",
        ],
        [
            [
                "healthy (reference, same router)",
                "",
                "",
                fmt(statistics.median(healthy), 2),
                "",
                "",
            ],
            row("refuses connections", dead),
            row("hangs (attempt_timeout=1.0)", hang),
        ],
        note="Breaker: opens after 5 consecutive retryable failures, open for 30 s (HealthRegistry"
        " defaults); with it open, the dead/hanging provider is skipped without an attempt.",
    )


# --- part 3: streaming ---------------------------------------------------------------------


async def part3(
    sim: _common.SimProcess,
    router: TenantLLMRouter,
    tenant: uuid.UUID,
    args: argparse.Namespace,
    stack: contextlib.AsyncExitStack,
) -> None:
    oa = openai.AsyncOpenAI(api_key=KEY, base_url=sim.base_url, max_retries=0)
    stack.push_async_callback(oa.close)
    create = oa.chat.completions.create
    perf = time.perf_counter

    async def bare() -> float | None:
        t0 = perf()
        ttft: float | None = None
        stream = await create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = perf() - t0
        return ttft

    h2 = httpx2.AsyncClient()
    stack.push_async_callback(h2.aclose)
    chat_url = f"{sim.base_url}/chat/completions"

    async def raw_sse() -> float | None:
        t0 = perf()
        ttft: float | None = None
        async with h2.stream("POST", chat_url, content=BODY_STREAM, headers=AUTH) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = orjson.loads(line[6:])
                choices = event.get("choices")
                if ttft is None and choices and choices[0]["delta"].get("content"):
                    ttft = perf() - t0
        return ttft

    async def routed() -> float | None:
        t0 = perf()
        ttft: float | None = None
        async with await router.stream_for_tenant(tenant, MESSAGES) as stream:
            async for chunk in stream:
                if ttft is None and chunk.content:
                    ttft = perf() - t0
        return ttft

    variants = [
        Variant("a", "openai SDK, stream=True", bare),
        Variant("d1", "httpx2 stream + line split + orjson", raw_sse),
        Variant("f", "router.stream_for_tenant", routed, after=tracker_flush(router)),
    ]
    n = args.stream_requests
    print(f"\nPart 3: streaming, concurrency 1, {n} requests per run, {args.repeats} repeats")
    await run_variants(variants, n, [1], args.repeats, args.slices)
    rows: list[list[object]] = []
    base = variants[0].median(1)
    for v in variants:
        m = v.median(1)
        assert m is not None and base is not None
        rows.append(
            [
                f"({v.key}) {v.label}",
                fmt(m.ttft_p50_ms, 2),
                fmt(m.ttft_p99_ms, 2),
                fmt(m.p50_ms, 2),
                fmt(m.cpu_us),
                v.cpu_range(1),
                fmt(m.flush_us) if v.after is not None else "",
                fmt(m.connects_per_1k, 1),
                f"{m.cpu_us / base.cpu_us:.2f}x",
            ]
        )
    _common.print_table(
        f"Part 3 - streaming, concurrency 1 (medians of {args.repeats} runs of {n} streams;"
        " 4 content chunks + usage chunk each)",
        [
            "variant",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "end p50 ms",
            "CPU µs/stream",
            "CPU range",
            "of which flush",
            "conns/1k",
            "CPU vs (a)",
        ],
        rows,
        note="TTFT: from the call to the first chunk with content in the caller's hands;"
        " conns/1k: new TCP connections per 1,000 streams (1,000: none reused).",
    )


# --- part 4: profile -----------------------------------------------------------------------

OURS = (str(_common.ROOT / "llm_gateway") + os.sep, str(_common.ROOT / "usage") + os.sep)


def _where(key: tuple[str, int, str]) -> str:
    filename, line, func = key
    rel = filename.removeprefix(str(_common.ROOT) + os.sep)
    return f"{rel}:{line} {func}"


ProfileTable = dict[tuple[str, int, str], tuple[int, int, float, float, Any]]


@dataclass(slots=True)
class Profile:
    """A cProfile of ``n`` routed requests and the same run's unprofiled CPU per request."""

    n: int
    plain_cpu_us: float
    table: ProfileTable
    idle: set[tuple[str, int, str]]

    def us(self, seconds: float) -> float:
        return seconds / self.n * 1e6

    @property
    def total(self) -> float:
        """Profiled µs per request, whole process, time blocked in the selector left out."""
        return self.us(sum(v[2] for k, v in self.table.items() if k not in self.idle))

    @property
    def scale(self) -> float:
        """Profiled µs -> estimated unprofiled µs (cProfile's overhead spread evenly)."""
        return self.plain_cpu_us / self.total

    def cum(self, path_suffix: str, func: str) -> float:
        """Cumulative profiled µs per request of one function (0 if never called)."""
        found: list[float] = [
            v[3] for k, v in self.table.items() if k[0].endswith(path_suffix) and k[2] == func
        ]
        return self.us(sum(found))

    def ours(self) -> ProfileTable:
        return {k: v for k, v in self.table.items() if k[0].startswith(OURS)}


async def profile_router(router: TenantLLMRouter, tenant: uuid.UUID, n: int) -> Profile:
    async def routed() -> None:
        await router.complete_for_tenant(tenant, MESSAGES)

    # The same run unprofiled first: its CPU per request scales the profile's figures.
    await timed_run(routed, 200, 1, tracker_flush(router))
    plain = await timed_run(routed, n, 1, tracker_flush(router))
    # cProfile's default (wall-clock) timer: a CPU-time timer costs a system call per event,
    # which distorts functions with many calls far more than preemption by other processes.
    profiler = cProfile.Profile()
    profiler.enable()
    await timed_run(routed, n, 1, tracker_flush(router), collect=False)
    profiler.disable()
    table: ProfileTable = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    # Time blocked in the event loop's selector is waiting, not CPU.
    idle = {k for k in table if k[0] == "~" and "poll" in k[2] and "select" in k[2]}
    return Profile(n, plain.cpu_us, table, idle)


def print_top(title: str, prof: Profile, sort_index: int, count: int = 25) -> None:
    """Our functions, heaviest first by own (2) or cumulative (3) time."""
    top = sorted(prof.ours().items(), key=lambda kv: kv[1][sort_index], reverse=True)[:count]
    scale = prof.scale
    _common.print_table(
        title,
        [
            "function (llm_gateway, usage)",
            "calls/req",
            "own µs",
            "cum µs",
            "est. own µs",
            "est. cum µs",
        ],
        [
            [
                _where(k),
                f"{v[1] / prof.n:.2f}",
                fmt(prof.us(v[2]), 1),
                fmt(prof.us(v[3]), 1),
                fmt(prof.us(v[2]) * scale, 1),
                fmt(prof.us(v[3]) * scale, 1),
            ]
            for k, v in top
        ],
        note="µs per request; calls/req counts every resumption of a coroutine as a call.",
    )


def print_by_file(title: str, prof: Profile) -> None:
    by_file: dict[str, float] = {}
    for (filename, _, _), v in prof.ours().items():
        rel = filename.removeprefix(str(_common.ROOT) + os.sep)
        by_file[rel] = by_file.get(rel, 0.0) + prof.us(v[2])
    _common.print_table(
        title,
        ["file", "own µs/req", "est. own µs/req"],
        [
            [f, fmt(t, 1), fmt(t * prof.scale, 1)]
            for f, t in sorted(by_file.items(), key=lambda kv: kv[1], reverse=True)
        ],
    )


def print_others(title: str, prof: Profile, count: int = 15) -> None:
    """The heaviest third-party / stdlib functions by own time."""
    others = sorted(
        ((k, v) for k, v in prof.table.items() if not k[0].startswith(OURS) and k not in prof.idle),
        key=lambda kv: kv[1][2],
        reverse=True,
    )[:count]
    _common.print_table(
        title,
        ["function", "calls/req", "own µs", "cum µs", "est. own µs"],
        [
            [
                _short(k),
                f"{v[1] / prof.n:.2f}",
                fmt(prof.us(v[2]), 1),
                fmt(prof.us(v[3]), 1),
                fmt(prof.us(v[2]) * prof.scale, 1),
            ]
            for k, v in others
        ],
    )


def explain_profile(prof: Profile, what: str) -> None:
    print(
        f"\n{what}: cProfile of {prof.n} requests at concurrency 1 (usage flush included)."
        f"\n  unprofiled: {prof.plain_cpu_us:,.0f} CPU µs/req; profiled: {prof.total:,.0f} µs/req"
        f" (wall-clock timer, time blocked in the selector left out);\n  'est. µs' = profiled"
        f" x {prof.scale:.2f}, i.e. cProfile's overhead spread evenly, which overstates"
        " functions with many small calls"
    )


async def part4(
    router: TenantLLMRouter,
    canned: TenantLLMRouter | None,
    tenant: uuid.UUID,
    args: argparse.Namespace,
) -> None:
    n: int = args.profile_requests
    prof = await profile_router(router, tenant, n)
    explain_profile(prof, "Part 4a - the router over HTTP")
    total = prof.total
    request = prof.cum("llm_gateway/router.py", "complete_for_tenant")
    sdk_call = prof.cum("llm_gateway/providers/base.py", "complete")
    sdk_request = prof.cum("openai/_base_client.py", "request")
    transform = prof.cum("openai/_utils/_transform.py", "async_maybe_transform")
    ours_own = prof.us(sum(v[2] for v in prof.ours().values()))

    def share_row(label: str, value: float) -> list[object]:
        return [label, fmt(value), fmt(value * prof.scale), f"{value / total:.0%}"]

    _common.print_table(
        "Where a routed request's CPU goes",
        ["", "profiled µs/req", "est. µs/req", "share"],
        [
            share_row("whole process (event loop, SDK, router, usage writer)", total),
            share_row("complete_for_tenant, cumulative", request),
            share_row("  of which Provider.complete (SDK call + parse_completion)", sdk_call),
            share_row("    of which openai _base_client request (HTTP, headers)", sdk_request),
            share_row("    of which openai async_maybe_transform (params)", transform),
            share_row("  router work around the SDK call (cum. difference)", request - sdk_call),
            share_row("own time of every function in llm_gateway + usage", ours_own),
        ],
    )
    print_top("Top 25 by cumulative time", prof, 3)
    print_top("Top 25 by own time", prof, 2)
    print_by_file("Own time by file", prof)
    print_others("For context: top 15 functions outside our packages by own time", prof)
    if canned is None:
        return
    prof = await profile_router(canned, tenant, n)
    explain_profile(prof, "Part 4b - the router with a canned provider (no HTTP, no SDK)")
    print_top("Top 25 by own time (canned provider)", prof, 2)
    print_by_file("Own time by file (canned provider)", prof)
    print_others("Top 15 functions outside our packages by own time (canned provider)", prof)


def _short(key: tuple[str, int, str]) -> str:
    filename, line, func = key
    if filename == "~":
        return func
    parts = Path(filename).parts
    cut = parts.index("site-packages") + 1 if "site-packages" in parts else len(parts) - 2
    parts = parts[cut:]
    return f"{'/'.join(parts)}:{line} {func}"


# --- main ----------------------------------------------------------------------------------


@contextlib.contextmanager
def private_spool() -> Iterator[str]:
    """Usage spool files of this run go to a temporary folder (never the user's spool)."""
    old = os.environ.get("LLM_GATEWAY_SPOOL_DIR")
    with tempfile.TemporaryDirectory(prefix="llmgw-bench-spool-") as folder:
        os.environ["LLM_GATEWAY_SPOOL_DIR"] = folder
        try:
            yield folder
        finally:
            if old is None:
                os.environ.pop("LLM_GATEWAY_SPOOL_DIR", None)
            else:
                os.environ["LLM_GATEWAY_SPOOL_DIR"] = old


async def amain(args: argparse.Namespace) -> None:
    client_pin = _common.pin_self(0) if _common.can_pin(1) else "not pinned (fewer than 2 CPUs)"
    CONNECTIONS.install()
    print("llm-gateway router benchmark")
    print(_common.environment(VERSIONS))
    started = time.perf_counter()
    with (
        private_spool(),
        _common.simulator("sim") as sim,
        _common.simulator("hang", fail_with="hang") as hang,
    ):
        sim_pin = f"CPU {sim.cpu}" if sim.cpu is not None else "not pinned"
        print(f"pinning: client process {client_pin}; simulators {sim_pin}")
        print(f"simulator: {sim.base_url} (pid {sim.pid}); hanging one: {hang.base_url}")
        async with _common.scratch_database(args.dsn, DB_NAME, keep=args.keep_db) as dsn:
            tenants = await seed(dsn)
            settings = {
                "llm7": provider_settings("llm7", sim.base_url),
                "openai": provider_settings("openai", _common.refused_url()),
                "openrouter": provider_settings("openrouter", hang.base_url),
            }
            async with contextlib.AsyncExitStack() as stack:
                router = await stack.enter_async_context(
                    TenantLLMRouter(dsn, providers={"llm7": settings["llm7"]})
                )
                await router.tenant_config(tenants.healthy)
                canned = await canned_router(dsn, settings["llm7"], sim)
                if canned is not None:
                    await stack.enter_async_context(canned)
                    await canned.tenant_config(tenants.healthy)
                if "1" in args.parts:
                    await part1(sim, router, canned, tenants.healthy, args, stack)
                if "3" in args.parts:
                    await part3(sim, router, tenants.healthy, args, stack)
                if "4" in args.parts and not args.skip_profile:
                    await part4(router, canned, tenants.healthy, args)
            if "2" in args.parts:
                await part2(dsn, settings, tenants, args)
    print(f"\ntotal time: {time.perf_counter() - started:.0f} s; {_common.load_average()}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dsn", default=_common.DEFAULT_ADMIN_DSN, help="admin DSN")
    parser.add_argument("--requests", type=int, default=2000, help="requests per run (part 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 64], help="part 1 concurrencies"
    )
    parser.add_argument("--stream-requests", type=int, default=500, help="streams per run")
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"part 1 variants, comma-separated (default {DEFAULT_VARIANTS}; also: b1)",
    )
    parser.add_argument(
        "--slices", type=int, default=4, help="slices per run, taken round-robin (default 4)"
    )
    parser.add_argument("--profile-requests", type=int, default=1000)
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument(
        "--parts", default="1234", help="which parts to run, e.g. 13 (default: 1234)"
    )
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database")
    args = parser.parse_args(argv)
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
