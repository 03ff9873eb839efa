"""Latency of the operator queries in ``sql/monitoring`` on a large ``model_usage_stats``.

How to run (PostgreSQL reachable through an admin DSN that may create databases)::

    python bench/bench_queries.py                  # 10 M rows: ~8 min on 2 CPUs, ~6 GB disk
    python bench/bench_queries.py --rows 200000    # quick check
    python bench/bench_queries.py --dsn postgresql://postgres@db:5432/postgres --runs 9
    python bench/bench_queries.py --keep            # keep the 10 M rows for later runs ...
    python bench/bench_queries.py --reuse --jit-off-only   # ... and measure again on them
    python bench/bench_queries.py --reuse --backfill-from-scratch   # time the back-fill too

What it does:

1. Creates the database ``llmgw_bench_queries`` (dropping a leftover one), applies the
   migrations, and creates the monthly partitions covering the 90 days of data.
2. Generates ``--rows`` rows spread evenly over the last 90 days, in time order as the usage
   writer inserts them, with ``INSERT ... SELECT FROM generate_series`` in chunks (two
   connections). 1,000 tenants, skewed: tenant k is drawn as floor(1000 * u**3), so tenant 0
   has ~10 % of all rows, tenant 1 ~2.6 %, and the median tenant ~0.05 %. Seven models over
   three providers (one without a price: NULL cost), ~7 % non-success rows of five statuses,
   NULL tokens on failures.
3. ``VACUUM ANALYZE``; times the parent ``ANALYZE`` that maintenance runs daily; back-fills the
   rollups with ``llm_gateway_maintain_usage()`` in one run, then times a steady-state
   maintenance run (what the usage writer pays every few minutes).
4. Runs every ``sql/monitoring/*.sql`` query for the median ("typical") tenant and the heaviest
   tenant (the all-tenant queries once), with ``jit = off``, with ``jit = on`` (PostgreSQL's
   default thresholds) and with JIT forced (``jit_above_cost = 0``: what a query pays once its
   estimate crosses the threshold), and prints the median latencies. Also prints the planner's
   group estimate for the all-tenant daily query with and without the extended statistics.

What is measured: client-side wall time of one execution (parse, plan, execute and fetching
every result row over a local TCP connection), as psql would see it: the tenant is inlined as
a literal, as psql's ``:'tenant_id'`` does, and no prepared statement is reused, so every run
is planned for its tenant. One warm-up run, then the median of ``--runs`` runs (warm cache).
The database is dropped at the end unless ``--keep`` is given. ``--reuse`` measures again on
a kept database (new migrations are applied; nothing is regenerated; a few maintenance runs
first). Whatever the migrations leave to the batched analytics back-fill (migration 012) is
run to the end first, a day per transaction, and timed; ``--backfill-from-scratch`` empties the
daily analytics rollups and stored anomaly scores first, so it times what upgrading a database
with rows costs. Figures are "median (min-max)" over the runs. The analytics part lives in
``_queries_analytics.py``, the generator in ``_queries_data.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
from _queries_analytics import bench_analytics, time_backfill
from _queries_data import (
    CHUNK,
    DAYS,
    GENERATE,
    HEAVY_TENANT,
    TENANTS,
    TYPICAL_TENANT,
    tenant_uuid_sql,
)

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "sql" / "monitoring"
DB_NAME = "llmgw_bench_queries"


@dataclass(frozen=True, slots=True)
class Result:
    query: str
    source: str
    tenant: str
    result_rows: int
    jit_off_ms: float
    jit_on_ms: float
    jit_forced_ms: float
    jit_off_spread: str


def _dsn_for(admin_dsn: str, database: str) -> str:
    base, _, _ = admin_dsn.rpartition("/")
    return f"{base}/{database}"


async def _recreate_database(admin_dsn: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    finally:
        await conn.close()


async def _drop_database(admin_dsn: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    finally:
        await conn.close()


async def _generate(dsn: str, rows: int, start: datetime) -> None:
    chunks = [(lo, min(lo + CHUNK - 1, rows)) for lo in range(1, rows + 1, CHUNK)]
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)
    done = 0

    async def worker() -> None:
        nonlocal done
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("SET synchronous_commit = off")
            while not queue.empty():
                lo, hi = queue.get_nowait()
                await conn.execute(GENERATE, lo, hi, rows, start)
                done += hi - lo + 1
                print(f"  generated {done:,} / {rows:,} rows", flush=True)
        finally:
            await conn.close()

    await asyncio.gather(worker(), worker())


# psql variables other than the tenant: a user every tenant has, and a session found per tenant.
_SESSIONS: dict[int, str] = {}


def _load_query(name: str, tenant: int | None) -> str:
    sql = (MONITORING / name).read_text()
    if tenant is not None:
        sql = sql.replace(":'tenant_id'", tenant_uuid_sql(tenant))
        sql = sql.replace(":'session_id'", f"'{_SESSIONS.get(tenant, 'none')}'")
    return sql.replace(":'user_id'", "'user-1'")


async def _time_query(conn: asyncpg.Connection, sql: str, runs: int) -> tuple[float, int, str]:
    await conn.fetch(sql)  # warm-up
    timings: list[float] = []
    result_rows = 0
    for _ in range(runs):
        started = time.perf_counter()
        result = await conn.fetch(sql)
        timings.append((time.perf_counter() - started) * 1000)
        result_rows = len(result)
    return statistics.median(timings), result_rows, f"{min(timings):.1f}-{max(timings):.1f}"


async def _bench_queries(
    conn: asyncpg.Connection, runs: int, jit_off_only: bool = False
) -> list[Result]:
    results: list[Result] = []
    tenants: list[tuple[str, int | None]] = [
        (f"typical (#{TYPICAL_TENANT})", TYPICAL_TENANT),
        (f"heaviest (#{HEAVY_TENANT})", HEAVY_TENANT),
    ]
    for path in sorted(MONITORING.glob("*.sql")):
        text = path.read_text()
        per_tenant = ":'tenant_id'" in text
        body = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
        source = "raw" if "model_usage_stats" in body else "rollup"
        query = path.stem.removesuffix("_rollup")
        for label, tenant in tenants if per_tenant else [("all tenants", None)]:
            sql = _load_query(path.name, tenant)
            await conn.execute("SET jit = off")
            off_ms, result_rows, spread = await _time_query(conn, sql, runs)
            on_ms = forced_ms = float("nan")
            if not jit_off_only:
                await conn.execute("SET jit = on")
                on_ms, _, _ = await _time_query(conn, sql, runs)
                await conn.execute("SET jit_above_cost = 0")
                forced_ms, _, _ = await _time_query(conn, sql, runs)
                await conn.execute("RESET jit_above_cost")
            results.append(
                Result(query, source, label, result_rows, off_ms, on_ms, forced_ms, spread)
            )
    await conn.execute("RESET jit")
    return sorted(results, key=lambda r: (r.query, r.tenant, r.source))


def _print_table(results: Sequence[Result]) -> None:
    header = (
        f"{'query':<30} {'source':<7} {'tenant':<15} {'rows out':>8} "
        f"{'jit=off ms':>11} {'(min-max)':>15} {'jit=on ms':>10} {'jit forced ms':>14}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.query:<30} {r.source:<7} {r.tenant:<15} {r.result_rows:>8} "
            f"{r.jit_off_ms:>11.1f} {r.jit_off_spread:>15} {r.jit_on_ms:>10.1f} "
            f"{r.jit_forced_ms:>14.1f}"
        )


async def _estimated_rows(conn: asyncpg.Connection, name: str) -> int:
    """The planner's estimate of the aggregate's output, before the final sort."""
    plan = json.loads(await conn.fetchval("EXPLAIN (FORMAT JSON) " + _load_query(name, None)))
    node = plan[0]["Plan"]
    while node["Node Type"] in ("Sort", "Gather Merge", "Gather") and "Plans" in node:
        node = node["Plans"][0]
    return int(node["Plan Rows"])


async def _timed(conn: asyncpg.Connection, sql: str) -> float:
    started = time.perf_counter()
    await conn.execute(sql)
    return time.perf_counter() - started


async def _database_has_rows(admin_dsn: str) -> bool:
    conn = await asyncpg.connect(admin_dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DB_NAME):
            return False
    finally:
        await conn.close()
    conn = await asyncpg.connect(_dsn_for(admin_dsn, DB_NAME))
    try:
        return bool(await conn.fetchval("SELECT EXISTS (SELECT FROM model_usage_stats)"))
    finally:
        await conn.close()


async def _populate(conn: asyncpg.Connection, dsn: str, rows: int) -> tuple[float, ...]:
    """Generate the rows and back-fill the rollups; the times of each step, in seconds."""
    now: datetime = await conn.fetchval("SELECT now()")
    start = now - timedelta(days=DAYS)
    await conn.execute("SELECT llm_gateway_ensure_usage_partitions(3, 4)")
    print(f"Generating {rows:,} rows over {DAYS} days for {TENANTS:,} tenants ...")
    started = time.perf_counter()
    await _generate(dsn, rows, start)
    generate_s = time.perf_counter() - started
    vacuum_s = await _timed(conn, "VACUUM ANALYZE model_usage_stats")
    analyze_s = await _timed(conn, "ANALYZE model_usage_stats")
    # Back-fill the whole rollup in one maintenance run.
    await conn.execute(
        "SELECT llm_gateway_set_setting('usage_stats_analyzed_at', now()::text);"
        "SELECT llm_gateway_set_setting('usage_rollup_max_hours_per_run', '100000')"
    )
    backfill_s = await _timed(conn, "SELECT llm_gateway_maintain_usage()")
    await conn.execute("SELECT llm_gateway_set_setting('usage_rollup_max_hours_per_run', '168')")
    await conn.execute("VACUUM ANALYZE")
    return generate_s, vacuum_s, analyze_s, backfill_s


async def run(
    admin_dsn: str,
    rows: int,
    runs: int,
    keep: bool,
    reuse: bool = False,
    jit_off_only: bool = False,
    backfill_from_scratch: bool = False,
) -> None:
    # Imported here so ``--help`` works without the package installed.
    from llm_gateway.migrate import apply_migrations

    dsn = _dsn_for(admin_dsn, DB_NAME)
    reusing = reuse and await _database_has_rows(admin_dsn)
    if not reusing:
        await _recreate_database(admin_dsn)
    try:
        migrate_s = time.perf_counter()
        await apply_migrations(dsn)
        migrate_s = time.perf_counter() - migrate_s
        conn = await asyncpg.connect(dsn, statement_cache_size=0)
        try:
            settings = await conn.fetch(
                "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])",
                ["shared_buffers", "work_mem", "max_parallel_workers_per_gather", "jit_above_cost"],
            )
            version = await conn.fetchval("SHOW server_version")
            print(f"PostgreSQL {version}; CPUs here: {os.cpu_count()}; load {os.getloadavg()}")
            print(
                "  " + ", ".join(f"{s['name']}={s['setting']}{s['unit'] or ''}" for s in settings)
            )
            if reusing:
                rows = await conn.fetchval("SELECT count(*) FROM model_usage_stats")
                print(f"Reusing {DB_NAME} ({rows:,} rows); migrations applied in {migrate_s:.1f} s")
                generate_s = vacuum_s = analyze_s = backfill_s = float("nan")
                await conn.execute("VACUUM ANALYZE")
            else:
                generate_s, vacuum_s, analyze_s, backfill_s = await _populate(conn, dsn, rows)
            # Whatever the migrations left to the batched back-fill (012), before measuring.
            await time_backfill(conn, backfill_from_scratch)
            # Steady state: what the usage writer pays every few minutes.
            await conn.execute("SELECT llm_gateway_maintain_usage()")
            steady = [await _timed(conn, "SELECT llm_gateway_maintain_usage()") for _ in range(5)]

            sizes = await conn.fetchrow(
                """
                SELECT sum(pg_table_size(relid)) AS heap,
                       sum(pg_indexes_size(relid)) AS indexes,
                       pg_total_relation_size('model_usage_hourly') AS rollup,
                       (SELECT count(*) FROM model_usage_hourly) AS rollup_rows,
                       count(*) FILTER (WHERE isleaf) AS partitions
                FROM pg_partition_tree('model_usage_stats')
                """
            )
            assert sizes is not None
            print(
                f"\nRows: {rows:,}; generation {generate_s:.1f} s "
                f"({rows / generate_s:,.0f} rows/s, indexes maintained during the insert)"
            )
            print(
                f"model_usage_stats: {sizes['partitions']} partitions, "
                f"heap {sizes['heap'] / 2**20:,.0f} MiB + "
                f"indexes {sizes['indexes'] / 2**20:,.0f} MiB"
            )
            print(
                f"model_usage_hourly: {sizes['rollup_rows']:,} rows, "
                f"{sizes['rollup'] / 2**20:,.0f} MiB with indexes"
            )
            print(
                f"VACUUM ANALYZE {vacuum_s:.1f} s; parent ANALYZE (daily in maintenance) "
                f"{analyze_s:.1f} s; rollup back-fill of {DAYS} days {backfill_s:.1f} s; "
                f"steady-state llm_gateway_maintain_usage() median "
                f"{statistics.median(steady) * 1000:.0f} ms "
                f"({min(steady) * 1000:.0f}-{max(steady) * 1000:.0f}, 5 runs)"
            )
            for label, k in (("typical", TYPICAL_TENANT), ("heaviest", HEAVY_TENANT)):
                counts = await conn.fetchrow(
                    f"""
                    SELECT count(*) FILTER (WHERE "timestamp" >= now() - interval '1 day') AS day,
                           count(*) AS month
                    FROM model_usage_stats
                    WHERE tenant_id = {tenant_uuid_sql(k)}
                      AND "timestamp" >= now() - interval '30 days'
                    """
                )
                assert counts is not None
                print(
                    f"{label} tenant #{k}: {counts['day']:,} rows in 24 h, "
                    f"{counts['month']:,} rows in 30 days"
                )
            with_stats = await _estimated_rows(conn, "daily_cost_all_tenants.sql")
            tx = conn.transaction()  # rolled back: the statistics stay
            await tx.start()
            try:
                await conn.execute("DROP STATISTICS model_usage_stats_day_utc")
                without_stats = await _estimated_rows(conn, "daily_cost_all_tenants.sql")
            finally:
                await tx.rollback()
            print(
                f"daily_cost_all_tenants: planner expects {with_stats:,} groups with the "
                f"extended statistics, {without_stats:,} without (actual: 90)"
            )

            print(
                f"\nMedian of {runs} runs, client-side wall time (plan + execute + fetch). "
                "jit=on: default thresholds; jit forced: jit_above_cost = 0, i.e. what JIT "
                "costs once a query's estimate crosses the threshold (e.g. a bigger tenant).\n"
            )
            for k in (TYPICAL_TENANT, HEAVY_TENANT):
                _SESSIONS[k] = await conn.fetchval(
                    f"SELECT session_id FROM model_usage_stats WHERE tenant_id ="
                    f" {tenant_uuid_sql(k)} AND session_id IS NOT NULL"
                    ' ORDER BY "timestamp" DESC LIMIT 1'
                )
            _print_table(await _bench_queries(conn, runs, jit_off_only))
            await bench_analytics(conn, dsn, runs, DB_NAME)
        finally:
            await conn.close()
    finally:
        if not keep:
            await _drop_database(admin_dsn)


def main() -> None:
    global DB_NAME
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="admin DSN; the benchmark database is created next to it",
    )
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument(
        "--reuse", action="store_true", help="measure on a kept database (implies --keep)"
    )
    parser.add_argument("--jit-off-only", action="store_true", help="skip the JIT columns")
    parser.add_argument("--database", default=DB_NAME, help=f"default {DB_NAME}")
    parser.add_argument(
        "--backfill-from-scratch",
        action="store_true",
        help="empty the daily analytics rollups of 009 and the stored anomaly scores, then time"
        " the batched back-fill that refills them (what upgrading a database with rows costs)",
    )
    args = parser.parse_args()
    DB_NAME = args.database
    asyncio.run(
        run(
            args.dsn, args.rows, args.runs, args.keep or args.reuse, args.reuse,
            args.jit_off_only, args.backfill_from_scratch,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
