"""Instructions per request of the router with metrics and tracing on and off (callgrind).

How to run (from the repository root; valgrind installed; same database and packages as
``bench_observability.py``)::

    python bench/bench_observability_callgrind.py                  # ~15 minutes
    python bench/bench_observability_callgrind.py --requests 300 --only off metrics  # quick look
    python bench/bench_observability_callgrind.py --profile unsampled   # cProfile, no valgrind

CPU time on a shared machine moves with the load; instruction counts do not. For each variant
of ``bench_observability.py`` (``off``, ``metrics``, ``unsampled``, ``tracing``, ``both``,
``both-10%``, ``sdk-around``),
for ``sdk-floor`` (two bare recorded OpenTelemetry SDK spans per "request", no router) and
``sdk-unsampled`` (one bare span its sampler drops; both ``bench_observability.SdkFloor``),
and, with ``--http``, for ``header-off`` / ``header-on`` (no router: the provider's
``complete()`` alone, without and with a ``traceparent`` in ``extra_headers``)
this runs one child process under ``valgrind --tool=callgrind`` (serially: ~2 minutes each):
it builds the router with the canned provider (``--http``: a simulator process, whose own
instructions are not counted), warms it up (200 requests), then runs
``--requests`` sequential requests, the usage flush and the span flush. Counting covers only
that measured part: callgrind zeroes its counters when the child enters ``os.getpgrp()`` and
dumps them when it enters ``os.getppid()`` (``--zero-before`` / ``--dump-before`` on
CPython's C functions of those names; nothing else in the child calls them). The figure is
the dump's instruction count (``Ir``) / requests, whatever the machine's load (the usage
writer's 0.2 s timer is set aside in the child, so its one write per slice is the final
flush; the batch span processor keeps its 5 s timer: its exports cost per span, not per
wake-up). Reruns of
the same code agree to within about 0.2 % (what varies: the event loop's wake-ups around the
usage writer's flushes, and the batch span processor's thread).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # bench/ is not a package: found through sys.path
import bench_observability as bo

from llm_gateway.keys import ApiKey
from llm_gateway.providers import create_provider, provider_settings

DB_NAME = "llmgw_bench_observability_cg"
# No router: the provider class alone over HTTP (--http), without and with a traceparent.
HEADER_KINDS = ("header-off", "header-on")
SDK_KINDS = ("sdk-floor", "sdk-unsampled")  # no router: bare SDK spans
KINDS = (*bo.VARIANTS, *SDK_KINDS, *HEADER_KINDS)


def provider_calls(url: str, traced: bool) -> tuple[Callable[[int], Awaitable[None]], Any]:
    """``run(k)``: ``k`` calls of the provider's ``complete()`` at ``url`` (``traced``: each
    with a ``traceparent`` of its own in ``extra_headers``, as a traced attempt sends); and
    the provider, to close."""
    provider = create_provider(provider_settings("llm7", url, api_key="bench-key"))
    key = ApiKey("bench-key", "system")

    async def run(k: int) -> None:
        for i in range(k):
            headers = {"traceparent": f"00-{i + 1:032x}-{i + 1:016x}-01"} if traced else None
            await provider.complete(
                key=key,
                model=bo.MODEL,
                messages=bo.MESSAGES,
                params={},
                timeout=30.0,
                extra_headers=headers,
            )

    return run, provider


async def child(
    kind: str, dsn: str, tenant: uuid.UUID, n: int, profile: str | None, url: str | None = None
) -> None:
    """The measured process: warm up, then ``n`` requests between the two markers
    (``url``: to the simulator there, else to the canned provider)."""
    run: Callable[[int], Awaitable[None]]
    close: Callable[[], Awaitable[None]]
    if kind in HEADER_KINDS:
        if url is None:
            raise SystemExit(f"{kind} needs --http")
        run, provider = provider_calls(url, kind == "header-on")
        close = provider.aclose
    elif kind in SDK_KINDS:
        floor = bo.SdkFloor(sampled=kind == "sdk-floor")
        run = floor.spans

        async def close() -> None:
            floor.close()

    else:
        v = await bo.make(kind, dsn, await bo.recorded_answer(), url)
        # One usage write per slice (its final flush), not one per 0.2 s of wall time: under
        # valgrind, and more so under load, the timer would add writes, hence instructions.
        assert v.router.usage_tracker is not None
        v.router.usage_tracker._flush_interval = 3600.0

        async def run_requests(k: int) -> None:
            await bo.requests(v, tenant, k)

        run = run_requests

        async def close() -> None:
            await v.router.close()
            if v.tracer_provider is not None:
                v.tracer_provider.shutdown()

    await run(min(200, n))  # warm-up: config cached, pools open, counters made
    gc.collect()
    prof = cProfile.Profile() if profile else None
    os.getpgrp()  # callgrind: --zero-before
    if prof is not None:
        prof.enable()
    await run(n)
    if prof is not None:
        prof.disable()
    os.getppid()  # callgrind: --dump-before
    await close()
    if prof is not None and profile:
        prof.dump_stats(profile)


def measure(
    kind: str,
    dsn: str,
    tenant: uuid.UUID,
    n: int,
    out: Path,
    url: str | None = None,
    cache_sim: bool = False,
) -> dict[str, float]:
    """Events per request of ``kind`` (``Ir``: instructions; with ``cache_sim`` also the
    simulated cache misses, ``I1mr``, ``D1mr``, ...), from one child under callgrind."""
    base = out / kind.replace("%", "pct")  # callgrind reads % in a file name
    cmd = [
        "valgrind",
        "--tool=callgrind",
        *(["--cache-sim=yes"] if cache_sim else []),
        f"--callgrind-out-file={base}.%p",
        "--zero-before=os_getpgrp",
        "--dump-before=os_getppid",
        sys.executable,
        __file__,
        "--child",
        kind,
        "--child-dsn",
        dsn,
        "--child-tenant",
        str(tenant),
        "--requests",
        str(n),
        *(["--child-url", url] if url else []),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind}: child failed\n{done.stderr[-3000:]}")
    dumps = sorted(out.glob(f"{base.name}.*.1"))  # part 1: zero .. dump
    if len(dumps) != 1:
        raise RuntimeError(f"{kind}: expected one dump, found {dumps}")
    text = dumps[0].read_text()
    events = re.search(r"^events: (.+)$", text, re.MULTILINE)
    found = re.search(r"^summary: (.+)$", text, re.MULTILINE)
    if events is None or found is None:
        raise RuntimeError(f"{kind}: no events or summary line in {dumps[0]}")
    counts = (int(x) / n for x in found.group(1).split())
    return dict(zip(events.group(1).split(), counts, strict=True))


async def setup(args: argparse.Namespace) -> tuple[str, uuid.UUID]:
    async with _common.scratch_database(args.dsn, args.db, keep=True) as dsn:
        return dsn, await bo.seed(dsn)


async def drop(args: argparse.Namespace) -> None:
    async with _common.scratch_database(args.dsn, args.db):
        pass


def report(figures: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    """The table: instructions (and simulated cache misses) per request, against ``off``."""
    base = figures.get("off")
    names = [e for e in next(iter(figures.values()), {}) if e != "Ir"]
    rows = []
    for kind, events in figures.items():
        ir = events["Ir"]
        added = share = ""
        if kind in HEADER_KINDS:  # against the provider alone, without the header
            plain = figures.get("header-off")
            if kind == "header-on" and plain is not None:
                added = f"{ir - plain['Ir']:+,.0f}"
                share = f"{(ir - plain['Ir']) / plain['Ir'] * 100:+.1f} % of header-off"
        elif base is not None and kind in SDK_KINDS:
            share = f"{ir / base['Ir'] * 100:.1f} % of off"
        elif base is not None and kind != "off":
            added, share = (
                f"{ir - base['Ir']:+,.0f}",
                f"{(ir - base['Ir']) / base['Ir'] * 100:+.1f} %",
            )
        rows.append((kind, f"{ir:,.0f}", added, share, *(f"{events[e]:,.0f}" for e in names)))
    where = "over HTTP to the simulator (this process's part)" if args.http else "canned provider"
    _common.print_table(
        f"Instructions per request, {where}, concurrency 1 ({args.requests}"
        " requests after a warm-up; usage flush and span flush included)",
        ("variant", "Ir / request", "vs off", "vs off", *names),
        rows,
        note="sdk-floor: two bare recorded SDK spans per iteration, no router;"
        " sdk-unsampled: one span the sampler drops (what a sampled-out request makes)."
        " Neither includes off. sdk-around: off with the sdk-floor spans made around each"
        " request by the bench. header-off/-on (--http): no router, the provider's complete()"
        " alone, without/with a traceparent header. With --cache-sim: callgrind's simulated"
        " misses per request (I1mr/D1mr/D1mw: first-level instruction/data read/write"
        " misses; ILmr/DLmr/DLmw: last level).",
    )
    ratio = traced_share(figures)
    if ratio is not None:
        print(
            f"Both on stays within 5 % of off while at most {ratio:.0%} of requests are"
            " recorded (from the metrics, unsampled and tracing rows; the rest sampled out)."
        )


def traced_share(figures: dict[str, dict[str, float]], budget: float = 0.05) -> float | None:
    """The largest share ``p`` of recorded requests with which metrics and tracing together
    add at most ``budget`` of ``off``: metrics + unsampled + p * (tracing - unsampled), each
    row's instructions above ``off`` (``None``: a row is missing)."""
    try:
        off, metrics, unsampled, traced = (
            figures[k]["Ir"] for k in ("off", "metrics", "unsampled", "tracing")
        )
    except KeyError:
        return None
    room = budget * off - (metrics - off) - (unsampled - off)
    return max(0.0, min(1.0, room / (traced - unsampled)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dsn", default=_common.DEFAULT_ADMIN_DSN, help="admin DSN")
    parser.add_argument("--requests", type=int, default=1000, help="measured requests")
    parser.add_argument("--db", default=DB_NAME, help="scratch database (created, dropped)")
    parser.add_argument("--only", nargs="*", choices=KINDS, help="these variants only")
    parser.add_argument("--profile", choices=KINDS, help="cProfile this variant, no valgrind")
    parser.add_argument("--http", action="store_true", help="to a simulator process over HTTP")
    parser.add_argument("--cache-sim", action="store_true", help="also simulate the caches")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--child-url", help=argparse.SUPPRESS)
    parser.add_argument("--child-dsn", help=argparse.SUPPRESS)
    parser.add_argument("--child-tenant", help=argparse.SUPPRESS)
    parser.add_argument("--child-profile", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    spool = tempfile.mkdtemp(prefix="llmgw-bench-spool-")
    os.environ["LLM_GATEWAY_SPOOL_DIR"] = spool
    if args.child:
        tenant = uuid.UUID(args.child_tenant)
        asyncio.run(
            child(
                args.child,
                args.child_dsn,
                tenant,
                args.requests,
                args.child_profile,
                args.child_url,
            )
        )
        return
    dsn, tenant = asyncio.run(setup(args))
    try:
        if args.profile:
            stats = Path(tempfile.mkdtemp(prefix="llmgw-prof-")) / "prof"
            asyncio.run(child(args.profile, dsn, tenant, args.requests, str(stats)))
            pstats.Stats(str(stats)).sort_stats("tottime").print_stats(40)
            return
        if shutil.which("valgrind") is None:
            raise SystemExit("valgrind is not installed")
        print("llm-gateway observability overhead: instructions per request (callgrind)")
        print(_common.environment(bo.VERSIONS))
        out = Path(tempfile.mkdtemp(prefix="llmgw-callgrind-"))
        with contextlib.ExitStack() as stack:
            url = None
            if args.http:  # the client's instructions only: the simulator is another process
                url = stack.enter_context(_common.simulator("llm7", cpu=1)).base_url
            figures = {}
            kinds = args.only or [k for k in KINDS if args.http or k not in HEADER_KINDS]
            for kind in kinds:
                figures[kind] = measure(kind, dsn, tenant, args.requests, out, url, args.cache_sim)
                print(f"  {kind}: {figures[kind]['Ir']:,.0f} instructions / request", flush=True)
        report(figures, args)
        shutil.rmtree(out, ignore_errors=True)
    finally:
        asyncio.run(drop(args))
        shutil.rmtree(spool, ignore_errors=True)


if __name__ == "__main__":
    main()
