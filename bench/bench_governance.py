"""What governance (budgets and rate limits) costs, and how far four processes overshoot.

Run (PostgreSQL through ``DATABASE_URL``, default the local server)::

    python bench/bench_governance.py [--loops 20000] [--repeats 7] [--requests 3000]
                                     [--parts abc] [--profile]

Creates a scratch database, applies the migrations, and measures:

(a) CPU per request added by admission on the cached path: ``QuotaGate.admit`` + the
    attempt's ``charge`` + ``release`` + ``Governor.rows_settled`` (the usage row written), in
    a loop against a Governor whose leases have room for the whole run (one renewal asked for
    it first, as concurrent requests' needs add up in one renewal). One variant per section
    (``budget``, ``limits`` rpm/tpm/rpd, ``user_limits``, ``system_keys``, ``rate_limits``), all
    of them, and none (the router skips admission: the loop's own cost). ``process_time`` per
    request; median and range over ``--repeats``. Target: <= 10 us with every limit set.
(b) Statements sent to PostgreSQL by the lease client per 1,000 requests in steady state: a
    router with every limit set (high) against an in-process simulator, ``--requests`` requests
    at concurrency 16 after a warm-up. Target: <= 20.
(c) Overshoot with four router processes (``tests/governance_router_worker.py``, 100 requests
    each, all at once): budget spend vs ``max_usd + 4 x worst case``; rpm: admitted requests in
    the busiest 60 s window vs ``requests_per_minute``; tpm: tokens in that window vs
    ``tokens_per_minute``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
from _common import DEFAULT_ADMIN_DSN, environment, print_table, scratch_database

from llm_gateway import TenantLLMRouter, provider_settings
from llm_gateway.chain import route_for
from llm_gateway.migrate import apply_migrations
from llm_gateway.simulator import SimulatedProvider
from llm_gateway.types import TaskType
from tests import governance_router_worker

PRICEY = "pricey-model"  # $1,000 per million tokens in and out
MSG = [{"role": "user", "content": "hello there"}]
USER = "alice"
HIGH_RATES = {
    "requests_per_minute": 10**9,
    "tokens_per_minute": 10**12,
    "requests_per_day": 10**9,
}
SECTIONS: dict[str, dict[str, Any]] = {
    "budget": {"budget": {"max_usd": 1e6, "alert_at": [0.5, 0.8, 1.0]}},
    "limits": {"limits": HIGH_RATES},
    "user_limits": {"user_limits": {"max_usd": 1e6, "period": "1d", **HIGH_RATES}},
    "system_keys": {"system_keys": {"max_usd": 1e6, **HIGH_RATES}},
    "rate_limits": {"rate_limits": {"llm7": HIGH_RATES}},
}
ALL = {k: v for section in SECTIONS.values() for k, v in section.items()}
PROCESSES = 4
# A request reserves about 7 input tokens (no estimated_tokens) + max_tokens=20.
WORST_TOKENS = len("hello there") // 4 + 4 + 1 + 20
WORST = WORST_TOKENS * 1000 / 1e6


async def _tenant(pg: asyncpg.Connection, config: dict[str, Any]) -> uuid.UUID:
    tid = uuid.uuid4()
    base = {"preferred_provider": "llm7", "preferred_models": {"llm7": PRICEY}}
    import json

    await pg.execute(
        "INSERT INTO tenants (id, name, llm_tokens, inference_config)"
        " VALUES ($1, 'bench', '{}'::jsonb, $2::jsonb)",
        tid,
        json.dumps(base | config),
    )
    return tid


def _spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    return f"{statistics.median(values) * scale:.{digits}f} [{min(values) * scale:.{digits}f}-" + (
        f"{max(values) * scale:.{digits}f}]"
    )


# --- (a) CPU per request on the cached path ---------------------------------------------------


async def part_a(
    dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider, args: argparse.Namespace
) -> None:
    spool = tempfile.mkdtemp(prefix="bench-gov-")
    settings = {"llm7": provider_settings("llm7", sim.base_url, api_key="sys-l")}
    rows = []
    async with TenantLLMRouter(dsn, providers=settings, spool_dir=spool) as router:
        gate = router._gate
        governor = gate.governor
        variants = {"none": {}, **SECTIONS, "all": ALL}
        for name, config in variants.items():
            t = await _tenant(pg, config)
            tokens_in = 7
            planner = router._planner
            tid, route = t, route_for(await router._store.get(t), None)
            chain = await planner.order(tid, route, tokens_in, time.monotonic() + 60)
            plan = route.quota
            ledger = planner.ledger(tid, "/bench", USER, TaskType.CHAT, None)
            params = {"max_tokens": 20}
            total = args.loops * (args.repeats + 1) + 10  # + the profiled loop
            if plan is not None:
                # A first admission makes the leases; then one renewal asks for the whole run.
                first = await gate.admit(plan, tid, USER, chain, tokens_in, params, ledger)
                gate.release(first, 27)
                draw = first.draw
                assert draw is not None
                per_request = {
                    **{lease.spec.key: 1.0 for lease in draw.ones},
                    **{lease.spec.key: first.tokens for lease in draw.toks},
                    **{lease.spec.key: first.cost for lease in draw.costs},
                    **{lease.spec.key: first.sys_cost for lease in draw.sys_costs},
                }
                await governor._renew({k: a * total for k, a in per_request.items()})
                short = [
                    k for k, a in per_request.items() if governor._leases[k].room() < a * total
                ]
                if short:
                    raise RuntimeError(f"leases without room for the run: {short}")
            cost = Decimal("0.000027")
            statements = governor.client.statements
            per: list[float] = []
            for _ in range(args.repeats):
                ids = [uuid.uuid4() for _ in range(args.loops)]
                started = time.process_time()
                for usage_id in ids:
                    if plan is not None:
                        admission = await gate.admit(
                            plan, tid, USER, chain, tokens_in, params, ledger
                        )
                        ledger.on_cost(usage_id, cost, True)  # type: ignore[misc]
                        gate.release(admission, 27)
                        governor.rows_settled((usage_id,))
                per.append((time.process_time() - started) / args.loops)
            if governor.client.statements != statements:
                raise RuntimeError("a renewal ran during the timed loops: not the cached path")
            rows.append([name, _spread(per, 1e6), f"{len(per)} x {args.loops:,}"])
            if args.profile and name == args.profile_variant:
                profile = cProfile.Profile()
                profile.enable()
                for usage_id in (uuid.uuid4() for _ in range(args.loops)):
                    admission = await gate.admit(plan, tid, USER, chain, tokens_in, params, ledger)  # type: ignore[arg-type]
                    ledger.on_cost(usage_id, cost, True)  # type: ignore[misc]
                    gate.release(admission, 27)
                    governor.rows_settled((usage_id,))
                profile.disable()
                pstats.Stats(profile).sort_stats("tottime").print_stats(18)
    print_table(
        "(a) CPU per request: admit + charge + release + rows_settled, cached path",
        ["limits set", "us/request median [min-max]", "repeats"],
        rows,
        "target: <= 10 us with every limit set ('all'); 'none' is the loop alone",
    )


# --- (b) statements per 1,000 requests ------------------------------------------------------


async def _drive(router: TenantLLMRouter, tenant: uuid.UUID, n: int) -> None:
    """``n`` requests, 16 at a time, spread over 5 users."""
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with gate:
            await router.complete_for_tenant(tenant, MSG, max_tokens=20, user_id=f"user{i % 5}")

    await asyncio.gather(*(one(i) for i in range(n)))


async def part_b(
    dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider, args: argparse.Namespace
) -> None:
    spool = tempfile.mkdtemp(prefix="bench-gov-")
    settings = {"llm7": provider_settings("llm7", sim.base_url, api_key="sys-l")}
    figures: list[float] = []
    rates: list[float] = []
    for _ in range(args.b_repeats):
        t = await _tenant(pg, ALL)
        async with TenantLLMRouter(dsn, providers=settings, spool_dir=spool) as router:
            await _drive(router, t, 300)  # warm-up
            client = router._gate.governor.client
            before = client.statements
            started = time.monotonic()
            await _drive(router, t, args.requests)
            elapsed = time.monotonic() - started
            figures.append((client.statements - before) * 1000 / args.requests)
            rates.append(args.requests / elapsed)
    print_table(
        "(b) lease statements per 1,000 requests, steady state, every limit set (5 users)",
        ["requests", "statements / 1,000 median [min-max]", "requests/s median [min-max]"],
        [[f"{args.b_repeats} x {args.requests:,}", _spread(figures, 1, 1), _spread(rates, 1, 0)]],
        "target: <= 20",
    )


# --- (c) overshoot with four processes --------------------------------------------------------


def _spawn(dsn: str, url: str, tenant: uuid.UUID, n: int, tmp: Path) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    jobs = [(dsn, url, str(tenant), n, seed, str(tmp / f"s{seed}"), {}) for seed in range(4)]
    with ctx.Pool(PROCESSES) as pool:
        return pool.starmap(governance_router_worker.run, jobs)


async def _busiest_window(pg: asyncpg.Connection, tenant: uuid.UUID) -> tuple[int, int]:
    """Admitted requests and their tokens in the busiest 60 s window (success rows)."""
    found = await pg.fetch(
        "SELECT extract(epoch FROM timestamp) AS at, input_tokens + output_tokens AS tokens"
        " FROM model_usage_stats WHERE tenant_id = $1 AND status = 'success' ORDER BY 1",
        tenant,
    )
    best = (0, 0)
    for i, row in enumerate(found):
        window = [r for r in found[i:] if float(r["at"]) < float(row["at"]) + 60]
        best = max(best, (len(window), sum(r["tokens"] for r in window)))
    return best


async def part_c(
    dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider, args: argparse.Namespace
) -> None:
    n = 100
    cases = {
        "budget": {"budget": {"max_usd": 1.0}},
        "rpm": {"limits": {"requests_per_minute": 60}},
        "tpm": {"limits": {"tokens_per_minute": 1500}},
    }
    rows = []
    for name, config in cases.items():
        measured: list[float] = []
        bound = limit = 0.0
        for _ in range(args.c_repeats):
            t = await _tenant(pg, config)
            with tempfile.TemporaryDirectory() as tmp:
                await asyncio.to_thread(_spawn, dsn, sim.base_url, t, n, Path(tmp))
            if name == "budget":
                spent = await pg.fetchval(
                    "SELECT coalesce(sum(estimated_cost_usd), 0) FROM model_usage_stats"
                    " WHERE tenant_id = $1",
                    t,
                )
                measured.append(float(spent))
                limit, bound = 1.0, 1.0 + PROCESSES * WORST
            else:
                count, tokens = await _busiest_window(pg, t)
                measured.append(float(count if name == "rpm" else tokens))
                limit = bound = 60.0 if name == "rpm" else 1500.0
        digits = 4 if name == "budget" else 0
        rows.append(
            [
                name,
                f"{limit:g}",
                f"{bound:.4f}" if name == "budget" else f"{bound:g}",
                _spread(measured, 1, digits),
                f"{statistics.median(measured) / limit:.3f}",
            ]
        )
    print_table(
        f"(c) four processes x {n} requests at once, {args.c_repeats} repeats each",
        ["limit", "allowed", "bound", "measured median [min-max]", "measured / allowed"],
        rows,
        "budget: USD spent (bound max_usd + 4 x one request's worst case); rpm: admitted in the"
        " busiest 60 s window; tpm: tokens (in + out) of those requests",
    )


async def main(args: argparse.Namespace) -> None:
    print(environment(["asyncpg", "openai", "pydantic"]))
    async with scratch_database(args.dsn, "bench_governance") as dsn:
        await apply_migrations(dsn)
        pg = await asyncpg.connect(dsn)
        try:
            await pg.execute(
                "INSERT INTO model_prices (provider, model, input_per_m, output_per_m,"
                " effective_from) VALUES ('llm7', $1, 1000, 1000, '2000-01-01')",
                PRICEY,
            )
            async with SimulatedProvider(name="l", record_requests=False) as sim:
                if "a" in args.parts:
                    await part_a(dsn, pg, sim, args)
                if "b" in args.parts:
                    await part_b(dsn, pg, sim, args)
                if "c" in args.parts:
                    await part_c(dsn, pg, sim, args)
        finally:
            await pg.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=DEFAULT_ADMIN_DSN, help="admin DSN (CREATE DATABASE)")
    parser.add_argument("--loops", type=int, default=20_000, help="(a) requests per repeat")
    parser.add_argument("--repeats", type=int, default=7, help="(a) repeats per variant")
    parser.add_argument("--requests", type=int, default=3000, help="(b) requests per repeat")
    parser.add_argument("--b-repeats", type=int, default=3, help="(b) repeats")
    parser.add_argument("--c-repeats", type=int, default=3, help="(c) repeats per limit")
    parser.add_argument("--parts", default="abc", help="which parts to run (default: abc)")
    parser.add_argument("--profile", action="store_true", help="(a) cProfile the 'all' loop")
    parser.add_argument(
        "--profile-variant", default="all", help="(a) the variant --profile profiles"
    )
    asyncio.run(main(parser.parse_args()))
