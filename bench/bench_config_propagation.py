"""How fast a tenant config edit made by plain SQL reaches 4 router processes (migration 006).

Run from the repository root (PostgreSQL: ``--dsn``, default ``$DATABASE_URL`` or the local
server)::

    python bench/bench_config_propagation.py                 # 3 repeats of 200 edits + bulk
    python bench/bench_config_propagation.py --edits 50 --repeats 1 --skip-bulk   # quick look

Part 1: ``--processes`` router processes (spawned, ``cache_ttl=3600``, so only a notice makes
an edit visible) each make a request every ``--interval-ms`` (``router.tenant_config``: the
cached lookup a request starts with). The parent edits the tenant's ``inference_config`` in a
transaction and times from just before ``COMMIT`` to the first request in each process that
returns the new config (one ``CLOCK_MONOTONIC`` for the machine). Figures: p50 / p99 over the
edits x processes, and of the slowest process per edit, per repeat; medians and ranges over
the repeats.

Part 2: bulk edits of ``--bulk-tenants`` tenants in one transaction (one UPDATE; and one UPDATE
per tenant) while each process has ``--cached`` of them cached: time until sampled cached
tenants show the new config in every process, the listener's notices and handler time, and
the worst event-loop stall (a 1 ms timer woken late) within 3 s of the commit,
next to the worst stall during part 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import queue
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _common
import asyncpg

from llm_gateway import TenantLLMRouter
from llm_gateway.migrate import apply_migrations

LAG_MS = 2.0  # stalls below this are not recorded (the sleep's own jitter)


def _config(version: str) -> str:
    return json.dumps({"preferred_provider": "groq", "preferred_models": {"groq": version}})


# --- the router processes ----------------------------------------------------------------------


async def _worker(
    idx: int, dsn: str, tenant: str, sample: list[str], cached: list[str], args: dict[str, Any],
    events: Any, stop: Any,
) -> None:  # fmt: skip
    tid = uuid.UUID(tenant)
    sampled = [uuid.UUID(s) for s in sample]
    interval = args["interval_ms"] / 1000
    router = TenantLLMRouter(dsn, providers={}, record_usage=False, cache_ttl=3600)
    async with router:
        for t in cached:
            await router.tenant_config(t)
        listener = router._listener  # the bench reads its counters
        assert listener is not None

        async def version(t: uuid.UUID) -> str | None:
            return (await router.tenant_config(t)).inference.preferred_models.get("groq")

        seen, bulk_seen = await version(tid), await version(sampled[0])
        lags: list[tuple[float, float, float]] = []

        async def ticker() -> None:
            # The event loop's stalls, apart from the requests (which may wait on a reload),
            # with the CPU this process used meanwhile (the rest: the OS ran something else).
            while True:
                before, cpu = time.monotonic(), time.process_time()
                await asyncio.sleep(0.001)
                now = time.monotonic()
                if (lag := (now - before - 0.001) * 1000) > LAG_MS:
                    lags.append((now, lag, (time.process_time() - cpu) * 1000))

        tick = asyncio.get_running_loop().create_task(ticker())
        events.put(("ready", idx))
        while not stop.is_set():
            now = time.monotonic()
            current = await version(tid)
            if current != seen:
                seen = current
                events.put(("seen", idx, current, now))
            bulk = [await version(s) for s in sampled]
            if bulk[0] != bulk_seen and len(set(bulk)) == 1:
                bulk_seen = bulk[0]
                stats = (listener.notices, listener.handler_seconds, listener.handler_max)
                events.put(("bulk", idx, bulk_seen, now, stats))
            await asyncio.sleep(interval)
        tick.cancel()
        events.put(("done", idx, lags, listener.status()))


def _worker_main(*a: Any) -> None:
    asyncio.run(_worker(*a))


def _wait(events: Any, kind: str, key: str | None, n: int, timeout: float) -> list[tuple[Any, ...]]:
    """``n`` events of ``kind`` (for ``key``), in arrival order."""
    got: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            event = events.get(timeout=max(deadline - time.monotonic(), 0.001))
        except queue.Empty:
            raise RuntimeError(
                f"timed out waiting for {n} {kind!r} events ({len(got)} came)"
            ) from None
        if event[0] == kind and (key is None or event[2] == key):
            got.append(event)
    return got


# --- the parent --------------------------------------------------------------------------------


async def _edit(conn: asyncpg.Connection, sql: str, *params: Any) -> tuple[float, float]:
    """Run ``sql`` in a transaction; monotonic times just before COMMIT and once it returned."""
    await conn.execute("BEGIN")
    await conn.execute(sql, *params)
    committing = time.monotonic()
    await conn.execute("COMMIT")
    return committing, time.monotonic()


async def _bulk_rows(
    conn: asyncpg.Connection, ids: list[uuid.UUID], version: str
) -> tuple[float, float]:
    await conn.execute("BEGIN")
    await conn.executemany(
        "UPDATE tenants SET inference_config = $2::jsonb WHERE id = $1",
        [(t, _config(version)) for t in ids],
    )
    committing = time.monotonic()
    await conn.execute("COMMIT")
    return committing, time.monotonic()


async def _run(args: argparse.Namespace) -> None:
    print("llm-gateway config propagation benchmark")
    print(_common.environment(["asyncpg"]))
    admin = args.dsn or _common.DEFAULT_ADMIN_DSN
    async with _common.scratch_database(admin, "llmgw_bench_notify", keep=args.keep_db) as dsn:
        await apply_migrations(dsn)
        conn = await asyncpg.connect(dsn)
        tenant = uuid.uuid4()
        await conn.execute(
            "INSERT INTO tenants (id, name, inference_config) VALUES ($1, 'bench', $2::jsonb)",
            tenant,
            _config("v0"),
        )
        bulk: list[uuid.UUID] = await conn.fetchval(
            "WITH t AS (INSERT INTO tenants (name, inference_config) SELECT 'bulk', $2::jsonb"
            " FROM generate_series(1, $1) RETURNING id) SELECT array_agg(id) FROM t",
            args.bulk_tenants,
            _config("b0"),
        )
        rng = random.Random(7)
        cached = [str(t) for t in rng.sample(bulk, min(args.cached, len(bulk)))]
        sample = cached[:: max(1, len(cached) // 4)][:4]
        ctx = multiprocessing.get_context("spawn")
        events, stop = ctx.Queue(), ctx.Event()
        procs = [
            ctx.Process(
                target=_worker_main,
                args=(i, dsn, str(tenant), sample, cached, vars(args), events, stop),
            )
            for i in range(args.processes)
        ]
        for p in procs:
            p.start()
        loop = asyncio.get_running_loop()

        def wait(kind: str, key: str | None, timeout: float = 60) -> list[tuple[Any, ...]]:
            return _wait(events, kind, key, args.processes, timeout)

        try:
            await loop.run_in_executor(None, wait, "ready", None, 120)
            print(
                f"setup: {args.processes} router processes (spawn, cache_ttl=3600), a request"
                f" every {args.interval_ms:g} ms in each; {args.bulk_tenants} bulk tenants,"
                f" {len(cached)} cached per process"
            )
            per_repeat: list[dict[str, float]] = []
            edit_phase = (time.monotonic(), 0.0)
            version = 0
            for r in range(args.repeats):
                each: list[float] = []
                slowest: list[float] = []
                for _ in range(args.edits):
                    version += 1
                    key = f"v{version}"
                    t0, _ = await _edit(
                        conn,
                        "UPDATE tenants SET inference_config = $2::jsonb WHERE id = $1",
                        tenant,
                        _config(key),
                    )
                    seen = await loop.run_in_executor(None, wait, "seen", key)
                    ms = [(e[3] - t0) * 1000 for e in seen]
                    each += ms
                    slowest.append(max(ms))
                    await asyncio.sleep(rng.uniform(0.005, 0.025))
                fig = {
                    "p50": _common.percentile(each, 0.5),
                    "p99": _common.percentile(each, 0.99),
                    "max": max(each),
                    "slow_p50": _common.percentile(slowest, 0.5),
                    "slow_p99": _common.percentile(slowest, 0.99),
                }
                per_repeat.append(fig)
                print(
                    f"  repeat {r + 1}: p50 {fig['p50']:.2f} ms, p99 {fig['p99']:.2f} ms,"
                    f" max {fig['max']:.2f} ms; slowest process p50 {fig['slow_p50']:.2f},"
                    f" p99 {fig['slow_p99']:.2f} ms"
                )
            edit_phase = (edit_phase[0], time.monotonic())
            bulk_rows: list[list[Any]] = []
            windows: list[tuple[str, float]] = []
            if not args.skip_bulk:
                for name, kind in (
                    ("one UPDATE of all rows", "stmt"),
                    ("one UPDATE per row", "rows"),
                ):
                    for r in range(args.repeats):
                        key = f"b{kind}{r}"
                        if kind == "stmt":
                            t0, t1 = await _edit(
                                conn,
                                "UPDATE tenants SET inference_config = $1::jsonb"
                                " WHERE name = 'bulk'",
                                _config(key),
                            )
                        else:
                            t0, t1 = await _bulk_rows(conn, bulk, key)
                        got = await loop.run_in_executor(None, wait, "bulk", key, 120)
                        ms = max((e[3] - t0) * 1000 for e in got)
                        windows.append((f"{name} #{r + 1}", t0))
                        commit_ms = f"{(t1 - t0) * 1000:.1f}"
                        bulk_rows.append([f"{name} #{r + 1}", commit_ms, f"{ms:.1f}", got])
                        await asyncio.sleep(3.5)  # the stall window closes before the next
            stop.set()
            done = await loop.run_in_executor(None, wait, "done", None, 60)
        finally:
            stop.set()
            for p in procs:
                p.join(15)
                if p.is_alive():
                    p.kill()
            await conn.close()

    lags = [lag for e in done for lag in e[2]]

    def worst(start: float, end: float) -> str:
        """The longest stall in [start, end] and the CPU the process used during it."""
        found = [(lag, cpu) for t, lag, cpu in lags if start <= t <= end]
        lag, cpu = max(found, default=(0.0, 0.0))
        return f"{lag:.1f} (CPU {cpu:.1f})"

    def med(k: str) -> str:
        values = [f[k] for f in per_repeat]
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    _common.print_table(
        f"Part 1 - COMMIT to the first request using the new config ({args.edits} edits x"
        f" {args.processes} processes per repeat; medians of {args.repeats} repeats, range)",
        ["figure", "ms"],
        [
            ["p50, each process", med("p50")],
            ["p99, each process", med("p99")],
            ["max, each process", med("max")],
            ["p50, slowest of the processes", med("slow_p50")],
            ["p99, slowest of the processes", med("slow_p99")],
        ],
        f"request interval {args.interval_ms:g} ms (adds up to that much); worst event-loop"
        f" stall (a 1 ms timer's lateness, ms) during part 1: {worst(*edit_phase)}",
    )
    if bulk_rows:
        rows = []
        for (label, commit_ms, ms, got), (_, t0) in zip(bulk_rows, windows, strict=True):
            handler = max(e[4][1] for e in got) * 1000
            longest = max(e[4][2] for e in got) * 1000
            stall = worst(t0, t0 + 3)
            rows.append([label, commit_ms, ms, f"{handler:.1f}", f"{longest:.2f}", stall])
        _common.print_table(
            f"Part 2 - bulk edit of {args.bulk_tenants} tenants in one transaction",
            [
                "edit",
                "COMMIT ms",
                "all see it ms",
                "handler CPU ms (cum.)",
                "longest slice CPU ms",
                "worst stall ms",
            ],
            rows,
            "COMMIT ms: the COMMIT statement's own time; all see it: from before COMMIT to"
            " the first request in the last process whose 4 sampled cached tenants all show"
            " the new config; handler CPU ms: the listener's notice-handling CPU time in the"
            " busiest process, cumulative since start (part 1 included); longest slice: the"
            " CPU time of the longest drain slice so far in any process; worst stall: the"
            " latest wake-up of a 1 ms timer in any process within 3 s of the COMMIT (OS"
            " scheduling included).",
        )
    status = done[0][3]
    print(
        f"\nlistener of process 0 at the end: {status['notices']} notices,"
        f" {status['tenant_ids']} tenant ids, handler {status['handler_ms']:.1f} ms in all,"
        f" {status['connects']} connect(s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="admin DSN (default $DATABASE_URL or the local server)")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--edits", type=int, default=200, help="edits per repeat (part 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interval-ms", type=float, default=1.0, help="between requests")
    parser.add_argument("--bulk-tenants", type=int, default=10_000)
    parser.add_argument("--cached", type=int, default=1000, help="bulk tenants cached per process")
    parser.add_argument("--skip-bulk", action="store_true")
    parser.add_argument("--keep-db", action="store_true")
    asyncio.run(_run(parser.parse_args()))


if __name__ == "__main__":
    main()
