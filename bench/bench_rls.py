"""What the tenant row-level-security policy (migration 007) costs a reader's query.

How to run (PostgreSQL reachable through an admin DSN that may create databases and roles)::

    python bench/bench_rls.py                   # 2 M rows: ~1-2 min on 2 CPUs
    python bench/bench_rls.py --rows 200000     # quick look

What it does: creates the database ``llmgw_bench_rls`` (dropping a leftover one), applies the
migrations, makes the monthly partitions of the last 90 days and fills ``model_usage_stats``
with ``--rows`` rows over those days, 1,000 tenants skewed as in ``bench_queries.py`` (tenant
k drawn as floor(1000 * u**3): tenant 0 has ~10 % of the rows, the median tenant ~0.05 %),
then ``VACUUM ANALYZE``. A login role ``llmgw_bench_rls_<random>``, member of
``llm_gateway_tenant_reader``, is created and dropped at the end.

Each query runs for the median and the heaviest tenant in three ways:

- ``bypass``: the admin role (RLS does not apply), the tenant in the ``WHERE``: today's cost;
- ``policy``: the reader inside ``usage.tenant_scope``, no tenant in the ``WHERE`` (the policy
  alone picks the rows);
- ``policy+where``: the reader inside ``tenant_scope`` with the tenant in the ``WHERE`` too.

Timed: client wall time of one ``fetch`` (plan, execute, rows back; no prepared statement
reused, the tenant inlined as a literal), inside an already open transaction for the reader
(``set_config`` is not counted). One warm-up, then the median and the min-max of ``--runs``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

import _common
import asyncpg

from llm_gateway.migrate import apply_migrations
from usage import tenant_scope

QUERIES = {
    "last day: requests, tokens, cost": (
        "SELECT count(*), sum(total_tokens), sum(estimated_cost_usd) FROM model_usage_stats"
        " WHERE \"timestamp\" >= now() - interval '1 day'{tenant}"
    ),
    "30 days: cost per UTC day": (
        "SELECT (\"timestamp\" AT TIME ZONE 'UTC')::date AS day, sum(estimated_cost_usd)"
        " FROM model_usage_stats WHERE \"timestamp\" >= now() - interval '30 days'{tenant}"
        " GROUP BY 1 ORDER BY 1"
    ),
    "hourly rollup, 7 days": (
        "SELECT model_name, sum(requests), sum(cost_usd) FROM model_usage_hourly"
        " WHERE hour >= now() - interval '7 days'{tenant} GROUP BY 1"
    ),
}

_FILL = """
INSERT INTO model_usage_stats (id, tenant_id, provider, model_name, input_tokens, output_tokens,
                               latency_ms, estimated_cost_usd, status, "timestamp")
SELECT gen_random_uuid(),
       ('00000000-0000-0000-0000-' || lpad(k::text, 12, '0'))::uuid,
       'groq', 'm' || (g % 7), 100 + g % 900, 50 + g % 400, 100 + g % 3000,
       (g % 1000) / 100000.0, CASE WHEN g % 14 = 0 THEN 'error' ELSE 'success' END,
       $3::timestamptz + g * $4::interval
  FROM (SELECT g, floor(1000 * power(random(), 3))::int AS k
          FROM generate_series($1::bigint, $2::bigint) AS g) AS r
"""


async def _fill(dsn: str, rows: int) -> tuple[uuid.UUID, uuid.UUID]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT * FROM llm_gateway_ensure_usage_partitions(1, 3)")
        start = datetime.now(UTC) - timedelta(days=90)
        step = timedelta(days=90) / rows
        chunk = 200_000
        for lo in range(0, rows, chunk):
            await conn.execute(_FILL, lo, min(rows, lo + chunk) - 1, start, step)
        await conn.execute("VACUUM ANALYZE model_usage_stats")
        await conn.execute("SELECT * FROM llm_gateway_refresh_usage_hourly($1, now())", start)
        await conn.execute("VACUUM ANALYZE model_usage_hourly")
        per_tenant = await conn.fetch(
            "SELECT tenant_id, count(*) AS n FROM model_usage_stats GROUP BY 1 ORDER BY 2 DESC"
        )
    finally:
        await conn.close()
    return per_tenant[len(per_tenant) // 2]["tenant_id"], per_tenant[0]["tenant_id"]


async def _time(conn: asyncpg.Connection, sql: str, runs: int) -> list[float]:
    await conn.fetch(sql)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await conn.fetch(sql)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def _figure(times: list[float]) -> str:
    return f"{statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f})"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default=_common.DEFAULT_ADMIN_DSN)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument(
        "--explain", action="store_true", help="print the heaviest tenant's plans, both ways"
    )
    args = parser.parse_args()
    print(_common.environment(["asyncpg"]))
    reader = f"llmgw_bench_rls_{uuid.uuid4().hex[:8]}"
    try:
        async with _common.scratch_database(args.dsn, "llmgw_bench_rls") as dsn:
            await apply_migrations(dsn)  # as the admin: it may create llm_gateway_tenant_reader
            admin = await asyncpg.connect(dsn)
            try:
                await admin.execute(f"CREATE ROLE {reader} LOGIN IN ROLE llm_gateway_tenant_reader")
                median, heavy = await _fill(dsn, args.rows)
                scoped = await asyncpg.connect(dsn, user=reader)
                try:
                    rows = await _measure(admin, scoped, median, heavy, args.runs)
                    if args.explain:
                        await _explain(admin, scoped, heavy)
                finally:
                    await scoped.close()
            finally:
                await admin.close()
    finally:
        drop = await asyncpg.connect(args.dsn)
        try:
            await drop.execute(f"DROP ROLE IF EXISTS {reader}")
        finally:
            await drop.close()
    _common.print_table(
        f"{args.rows:,} rows, 1,000 tenants; ms, median (min-max) of {args.runs} runs",
        ["query", "bypass", "policy", "policy+where"],
        rows,
    )


async def _explain(
    admin: asyncpg.Connection, scoped: asyncpg.Connection, tenant: uuid.UUID
) -> None:
    for name, sql in QUERIES.items():
        explain = "EXPLAIN (ANALYZE, COSTS OFF, SUMMARY OFF) "
        plan = await admin.fetch(explain + sql.format(tenant=f" AND tenant_id = '{tenant}'"))
        print(f"\n--- {name}, bypass:")
        print("\n".join(r[0] for r in plan))
        async with tenant_scope(scoped, tenant):
            plan = await scoped.fetch(explain + sql.format(tenant=""))
        print(f"--- {name}, policy:")
        print("\n".join(r[0] for r in plan))


async def _measure(
    admin: asyncpg.Connection,
    scoped: asyncpg.Connection,
    median: uuid.UUID,
    heavy: uuid.UUID,
    runs: int,
) -> list[list[str]]:
    rows = []
    for label, tenant in (("median", median), ("heaviest", heavy)):
        where = f" AND tenant_id = '{tenant}'"
        for name, sql in QUERIES.items():
            bypass = await _time(admin, sql.format(tenant=where), runs)
            async with tenant_scope(scoped, tenant):
                alone = await _time(scoped, sql.format(tenant=""), runs)
                both = await _time(scoped, sql.format(tenant=where), runs)
            rows.append([f"{label}: {name}", _figure(bypass), _figure(alone), _figure(both)])
    return rows


if __name__ == "__main__":
    asyncio.run(main())
