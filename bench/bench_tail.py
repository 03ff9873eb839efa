"""Tail latency: a hung first provider (adaptive attempt caps) and hedged requests.

Run from the repository root (PostgreSQL through ``--dsn`` or ``DATABASE_URL``)::

    python bench/bench_tail.py                      # ~3 minutes
    python bench/bench_tail.py --parts 1 --repeats 1 --skip-baseline   # ~20 s look

Part 1: time to answer with one hung provider first in the chain and a healthy one behind it,
default settings, warm (20 answers of the hung provider seen before it hangs) and cold (none),
each with a fresh router; the baseline is the same request without adaptive caps
(``HealthRegistry(timeouts=None)``, the old default: only the 60 s deadline).

Part 2: two providers whose latency has a heavy tail (``LatencyDistribution``); p50, p99 and
p99.9 of N requests at concurrency C, bare SDK and router without and with hedging, and the
extra requests and cost the hedges took. The simulators run in this process (the latency
distribution is a constructor option), so client and servers share the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _common

from llm_gateway import (
    CompletionResult,
    DeadlineExceededError,
    TenantLLMRouter,
    provider_settings,
)
from llm_gateway.health import HealthRegistry
from llm_gateway.migrate import apply_migrations
from llm_gateway.simulator import LatencyDistribution, SimulatedProvider

MSG = [{"role": "user", "content": "hello there, how are you today?"}]
TAIL = LatencyDistribution(40, sigma=0.25, tail_rate=0.02, tail_ms=1500)


def settings(a: SimulatedProvider, b: SimulatedProvider) -> dict[str, Any]:
    return {
        "groq": provider_settings("groq", a.root_url, api_key="sys-a"),
        "llm7": provider_settings("llm7", b.base_url, api_key="sys-b"),
    }


async def make_tenant(dsn: str) -> uuid.UUID:
    tid = uuid.uuid4()
    conn = await asyncpg.connect(dsn)
    try:
        config = {"preferred_provider": "groq", "fallback_order": ["llm7"]}
        await conn.execute(
            "INSERT INTO tenants (id, name, llm_tokens, inference_config)"
            " VALUES ($1, 'bench', '{}'::jsonb, $2::jsonb)",
            tid,
            json.dumps(config),
        )
    finally:
        await conn.close()
    return tid


# --- part 1: a hung provider first in the chain ---------------------------------------------


async def hung_once(
    dsn: str, tid: uuid.UUID, spool: str, *, warm: bool, adaptive: bool
) -> tuple[float, str]:
    """Seconds until a request ends with the first provider hung (a fresh router), and how."""
    async with SimulatedProvider(name="a") as a, SimulatedProvider(name="b") as b:
        health = HealthRegistry() if adaptive else HealthRegistry(timeouts=None)
        async with TenantLLMRouter(
            dsn, providers=settings(a, b), health=health, spool_dir=spool
        ) as router:
            if warm:
                await asyncio.gather(*(router.complete_for_tenant(tid, MSG) for _ in range(20)))
            a.fail_with = "hang"
            started = time.monotonic()
            try:
                result = await router.complete_for_tenant(tid, MSG)
            except DeadlineExceededError:
                return time.monotonic() - started, "DeadlineExceededError, no answer"
            return time.monotonic() - started, f"answered by {result.provider}"


async def part1(dsn: str, tid: uuid.UUID, spool: str, repeats: int, baseline: bool) -> None:
    rows: list[list[object]] = []
    for label, warm in (("warm (20 answers seen)", True), ("cold (no samples)", False)):
        runs = [await hung_once(dsn, tid, spool, warm=warm, adaptive=True) for _ in range(repeats)]
        times = [t for t, _ in runs]
        spread = f"{min(times):.2f}-{max(times):.2f}"
        rows.append([label, f"{statistics.median(times):.2f}", spread, runs[0][1]])
    if baseline:
        t, how = await hung_once(dsn, tid, spool, warm=True, adaptive=False)
        rows.append(["no adaptive cap (old default)", f"{t:.2f}", "1 run", how])
    _common.print_table(
        "Part 1: time to answer, hung provider first, healthy one second (seconds)",
        ["case", "median", "spread", "outcome"],
        rows,
        f"{repeats} fresh routers per case; default settings (timeout 60 s, no attempt_timeout).",
    )


# --- part 2: hedging against a heavy tail ---------------------------------------------------


def pct(values: list[float], q: float) -> float:
    return _common.percentile(values, q) * 1000


async def drive(n: int, concurrency: int, call: Callable[[], Awaitable[Any]]) -> list[Any]:
    """``n`` calls by ``concurrency`` workers; returns (latency, result) pairs."""
    out: list[Any] = []
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.monotonic()
            result = await call()
            out.append((time.monotonic() - t0, result))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def hedge_run(
    dsn: str, tid: uuid.UUID, spool: str, variant: str, n: int, concurrency: int, seed: int
) -> dict[str, float]:
    a = SimulatedProvider(name="a", latency_dist=TAIL, seed=seed, record_requests=False)
    b = SimulatedProvider(name="b", latency_dist=TAIL, seed=seed + 1, record_requests=False)
    async with a, b:
        if variant == "bare SDK (openai)":
            client = openai.AsyncOpenAI(api_key="k", base_url=a.base_url, max_retries=0)
            try:
                call = lambda: client.chat.completions.create(model="m", messages=MSG)  # noqa: E731
                await drive(50, concurrency, call)
                before = a._seq + b._seq
                done = await drive(n, concurrency, call)
                sent = a._seq + b._seq - before
            finally:
                await client.close()
            lat = [d for d, _ in done]
            return {"lat": lat, "extra": sent - n, "extra_cost": 0.0}  # type: ignore[dict-item]
        hedge = None if variant == "router, no hedge" else json.loads(variant.split(" ", 2)[2])
        async with TenantLLMRouter(
            dsn, providers=settings(a, b), hedge=hedge, spool_dir=spool
        ) as router:

            def call() -> Awaitable[CompletionResult]:
                return router.complete_for_tenant(tid, MSG, timeout=30)

            await drive(50, concurrency, call)  # warm: pools, config cache, latency sketch
            before = a._seq + b._seq
            done = await drive(n, concurrency, call)
            sent = a._seq + b._seq - before
    lat = [d for d, _ in done]
    # A cancelled hedge is billed (at most) like an answer of its provider: the upper bound.
    cost_by: dict[str, list[Decimal]] = defaultdict(list)
    for _, r in done:
        if r.cost is not None:
            cost_by[r.provider].append(r.cost)
    mean = {p: sum(c) / len(c) for p, c in cost_by.items()}
    paid = sum(sum(c) for c in cost_by.values())
    extra = sum(
        mean.get(x.provider, Decimal(0))
        for _, r in done
        for x in r.attempts
        if x.outcome == "cancelled"
    )
    return {"lat": lat, "extra": sent - n, "extra_cost": float(extra / paid) if paid else 0.0}  # type: ignore[dict-item]


async def part2(
    dsn: str, tid: uuid.UUID, spool: str, n: int, concurrency: int, repeats: int
) -> None:
    variants = [
        "bare SDK (openai)",
        "router, no hedge",
        'router, hedge {"after": "p95"}',
        'router, hedge {"after_ms": 250}',
    ]
    figures: dict[str, list[dict[str, float]]] = defaultdict(list)
    for r in range(repeats):  # round-robin: a change of load hits every variant alike
        for v in variants:
            figures[v].append(await hedge_run(dsn, tid, spool, v, n, concurrency, seed=100 * r))
    rows = []
    for v in variants:
        runs = figures[v]

        def med(f: Callable[[dict[str, Any]], float], runs: list[dict[str, Any]] = runs) -> str:
            values = [f(x) for x in runs]
            return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"

        rows.append(
            [
                v,
                med(lambda x: pct(x["lat"], 0.50)),
                med(lambda x: pct(x["lat"], 0.99)),
                med(lambda x: pct(x["lat"], 0.999)),
                f"{statistics.median(x['extra'] / n * 100 for x in runs):.1f}%",
                f"{statistics.median(x['extra_cost'] * 100 for x in runs):.1f}%",
            ]
        )
    _common.print_table(
        f"Part 2: latency (ms) with a heavy tail, {n} requests at concurrency {concurrency},"
        f" median (min-max) of {repeats}",
        ["variant", "p50", "p99", "p99.9", "extra requests", "extra cost (upper bound)"],
        rows,
        f"Both providers: {TAIL}. Extra cost: cancelled hedges priced like an answer of their"
        " provider, as a share of what the answers cost.",
    )


async def main(args: argparse.Namespace) -> None:
    print(_common.environment(["openai", "groq", "httpx", "asyncpg"]))
    async with _common.scratch_database(args.dsn, "llmgw_bench_tail", keep=args.keep_db) as dsn:
        await apply_migrations(dsn)
        tid = await make_tenant(dsn)
        with tempfile.TemporaryDirectory() as spool:
            if "1" in args.parts:
                await part1(dsn, tid, spool, args.repeats, not args.skip_baseline)
            if "2" in args.parts:
                await part2(dsn, tid, spool, args.requests, args.concurrency, args.repeats)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=_common.DEFAULT_ADMIN_DSN)
    parser.add_argument("--parts", default="12")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--keep-db", action="store_true")
    asyncio.run(main(parser.parse_args()))
