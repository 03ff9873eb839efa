"""bench_queries.py, continued: the analytics rollups (sizes, refresh and back-fill cost) and
the Python calls behind each analytics answer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
from _queries_data import DAYS, GENERATE, HEAVY_TENANT, TYPICAL_TENANT, tenant_uuid_sql

ROLLUPS = (
    "model_usage_hourly",
    "model_usage_daily_totals",
    "model_usage_user_daily",
    "model_usage_tenant_hourly",
    "model_usage_user_day",
    "model_usage_endpoint_daily",
    "model_usage_latency_daily",
    "model_usage_tag_daily",
    "model_usage_recent",
    "model_usage_tenant_baseline",
    "model_usage_anomaly_scores",
)


def _spread(timings: Sequence[float]) -> str:
    return f"{statistics.median(timings):,.1f} ({min(timings):,.1f}-{max(timings):,.1f})"


async def _median_ms(call: Callable[[], Awaitable[object]], runs: int) -> str:
    await call()  # warm-up
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        timings.append((time.perf_counter() - started) * 1000)
    return _spread(timings)


async def _timed(conn: asyncpg.Connection, sql: str) -> float:
    started = time.perf_counter()
    await conn.execute(sql)
    return time.perf_counter() - started


async def bench_analytics(conn: asyncpg.Connection, dsn: str, runs: int, db_name: str) -> None:
    """The analytics rollups' size and refresh cost, and the Python calls behind each answer."""
    from usage.analytics.anomalies import detect_anomalies
    from usage.analytics.monthly import get_monthly_usage
    from usage.analytics.recommend import CandidateModel, recommend_models
    from usage.analytics.report import GROUPINGS, usage_report
    from usage.pricing import default_price_book

    print("\nRollups (rows estimated by ANALYZE):")
    for table in ROLLUPS:
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
            await conn.execute(f"ANALYZE {table}")
            r = await conn.fetchrow(
                "SELECT reltuples::bigint AS rows, pg_total_relation_size(oid) AS bytes"
                " FROM pg_class WHERE oid = $1::regclass",
                table,
            )
            assert r is not None
            print(f"  {table:<28} {r['rows']:>12,} rows {r['bytes'] / 2**20:>8,.0f} MiB")
    # What one steady maintenance run recomputes: the last 3 hours (and their UTC days).
    window = "now() - interval '3 hours', now()"
    for fn in (
        "llm_gateway_refresh_usage_hourly_base",
        "llm_gateway_refresh_usage_analytics",
        "llm_gateway_score_usage_hours",  # 012: the stored anomaly scores of those hours
    ):
        if not await conn.fetchval("SELECT to_regproc($1) IS NOT NULL", fn):
            continue
        times = [await _timed(conn, f"SELECT {fn}({window})") for _ in range(3)]
        print(f"  {fn}(last 3 h): {_spread([t * 1000 for t in times])} ms")
    # A maintenance run every 5 minutes, each after 5 minutes of traffic at the generator's
    # average rate (rows spread over the last 5 minutes), as the usage writer sees it.
    per_run = max(1, round(await conn.fetchval("SELECT count(*) FROM model_usage_stats")
                           / (DAYS * 24 * 12)))  # fmt: skip
    times = []
    for _ in range(5):
        start = await conn.fetchval("SELECT now() - interval '5 minutes'")
        # Row g lands at start + (g - 1) / $3 * 90 days: these per_run rows fill 5 minutes.
        await conn.execute(GENERATE, 1, per_run, per_run * DAYS * 288, start)
        times.append(await _timed(conn, "SELECT llm_gateway_maintain_usage()") * 1000)
    print(f"  llm_gateway_maintain_usage() after {per_run:,} new rows: {_spread(times)} ms")
    if await conn.fetchval("SELECT to_regproc('llm_gateway_compute_usage_baselines') IS NOT NULL"):
        this_hour = "date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
        times = []
        for _ in range(3):
            await conn.execute(f"DELETE FROM model_usage_tenant_baseline WHERE hour = {this_hour}")
            times.append(await _timed(
                conn, f"SELECT llm_gateway_compute_usage_baselines({this_hour},"
                f" {this_hour} + interval '1 hour')") * 1000)  # fmt: skip
        print(f"  baselines of a new hour (first run in each hour): {_spread(times)} ms")

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        await pool.execute("ALTER DATABASE " + db_name + " SET jit = off")
        await pool.expire_connections()
        prices = default_price_book()
        candidates = [
            CandidateModel("openai", "gpt-4o-mini", 128_000),
            CandidateModel("groq", "llama-3.1-8b", 131_072),
        ]
        since_30d = datetime.now(UTC) - timedelta(days=30)
        rows: list[tuple[str, str, str]] = []
        for label, k in (("typical", TYPICAL_TENANT), ("heaviest", HEAVY_TENANT)):
            tid = await conn.fetchval(f"SELECT {tenant_uuid_sql(k)}")
            calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                ("get_monthly_usage", lambda t=tid: get_monthly_usage(pool, t)),
                (
                    "get_monthly_usage(user)",
                    lambda t=tid: get_monthly_usage(pool, t, None, "user-1"),
                ),
                ("detect_anomalies(24 h)", lambda t=tid: detect_anomalies(pool, tenant_id=t)),
                ("recommend_models", lambda t=tid: recommend_models(pool, prices, t, candidates)),
            ]
            calls += [
                (f"usage_report(by {by})",
                 lambda t=tid, b=by: usage_report(pool, since=since_30d, by=b, tenant_id=t))
                for by in GROUPINGS
            ]  # fmt: skip
            for name, call in calls:
                rows.append((name, label, await _median_ms(call, runs)))
        for span in (timedelta(hours=24), timedelta(days=7)):
            rows.append(
                (f"detect_anomalies({span.days * 24 or 24} h)", "all tenants",
                 await _median_ms(lambda s=span: detect_anomalies(pool, since=s), runs))
            )  # fmt: skip
        for by in ("day", "provider", "model"):
            rows.append(
                (f"usage_report(by {by})", "all tenants",
                 await _median_ms(lambda b=by: usage_report(pool, since=since_30d, by=b), runs))
            )  # fmt: skip
    finally:
        await pool.close()
    print(f"\nAnalytics calls (Python, jit off), ms, median (min-max) of {runs} runs:")
    for name, label, ms in rows:
        print(f"  {name:<28} {label:<12} {ms:>24}")


_BACKFILL_STATE = "SELECT * FROM llm_gateway_usage_analytics_backfill_state()"
# What upgrading a database with rows to 009/012 leaves to the back-fill: 009's daily
# rollups empty (008's per-user rollup and the tenant series were filled by 008), no stored
# anomaly scores, every day with rows marked.
_EMPTY_009_ROLLUPS = """
TRUNCATE model_usage_user_day, model_usage_endpoint_daily, model_usage_latency_daily,
         model_usage_tag_daily, model_usage_recent, model_usage_anomaly_scores;
SELECT llm_gateway_set_setting('usage_analytics_staged_from', NULL);
SELECT llm_gateway_set_setting('usage_anomaly_scores_from', NULL);
SELECT llm_gateway_set_setting('usage_anomaly_scores_to', NULL);
SELECT llm_gateway_set_setting('usage_analytics_backfill_before',
                               ((now() AT TIME ZONE 'UTC')::date + 1)::text);
"""


async def time_backfill(conn: asyncpg.Connection, from_scratch: bool) -> None:
    """Run the analytics back-fill (012) to the end, one batch (a day) per transaction, as
    ``llm-gateway db backfill`` does, and print what each part took."""
    if not await conn.fetchval(
        "SELECT to_regproc('llm_gateway_backfill_usage_analytics') IS NOT NULL"
    ):
        return
    if from_scratch:
        await conn.execute(_EMPTY_009_ROLLUPS)
    state = await conn.fetchrow(_BACKFILL_STATE)
    assert state is not None
    print(
        f"Analytics back-fill{' from scratch' if from_scratch else ''}: "
        f"{state['rollup_days_left']} days of daily rollups, "
        f"{state['score_days_left']} days of anomaly scores to do"
    )
    taken: dict[str, list[float]] = {}
    while True:
        started = time.perf_counter()
        row = await conn.fetchrow("SELECT * FROM llm_gateway_backfill_usage_analytics(1)")
        assert row is not None
        if row["part"] == "done":
            break
        taken.setdefault(row["part"], []).append(time.perf_counter() - started)
    for part, times in taken.items():
        print(
            f"  {part}: {len(times)} batches of a day, {sum(times):,.1f} s in all; per batch "
            f"{_spread(times)} s"
        )
    if taken:  # what autovacuum does soon after: index-only scans need the visibility map
        await conn.execute("VACUUM ANALYZE")
