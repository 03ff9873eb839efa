"""The daily analytics rollups of migration 009 (per user, endpoint, latency bucket and tag)
against the raw rows, through both refresh paths: by difference over the working set of recent
hours, and whole days from raw rows for older hours. Also the reports they serve."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from usage.analytics.report import usage_report

REFRESH = "SELECT llm_gateway_refresh_usage_hourly($1, $2)"
DAY = "(\"timestamp\" AT TIME ZONE 'UTC')::date"
BUCKET = "floor(ln(greatest(latency_ms, 1)) / ln(1.15))::smallint"

# (rollup query, the same numbers from the raw rows); $1 = tenant.
PAIRS = {
    "user_daily": (
        "SELECT user_id, day, provider, model_name, status, requests, input_tokens,"
        " output_tokens, cost_usd, unpriced_requests, latency_ms_sum"
        " FROM model_usage_user_daily WHERE tenant_id = $1",
        f"SELECT coalesce(user_id, ''), {DAY}, provider, model_name, status, count(*),"
        " sum(input_tokens), sum(output_tokens), sum(estimated_cost_usd),"
        " count(*) FILTER (WHERE estimated_cost_usd IS NULL), sum(latency_ms)"
        " FROM model_usage_stats WHERE tenant_id = $1 GROUP BY 1, 2, 3, 4, 5",
    ),
    "user_day": (
        "SELECT user_id, day, requests, errors, input_tokens, output_tokens, cost_usd"
        " FROM model_usage_user_day WHERE tenant_id = $1",
        f"SELECT coalesce(user_id, ''), {DAY}, count(*), count(*) FILTER"
        " (WHERE status <> 'success'), coalesce(sum(input_tokens), 0),"
        " coalesce(sum(output_tokens), 0), coalesce(sum(estimated_cost_usd), 0)"
        " FROM model_usage_stats WHERE tenant_id = $1 GROUP BY 1, 2",
    ),
    "endpoint_daily": (
        "SELECT endpoint, day, provider, model_name, requests, successes, ok_input_tokens,"
        " ok_output_tokens, cost_usd, unpriced_requests"
        " FROM model_usage_endpoint_daily WHERE tenant_id = $1",
        f"SELECT coalesce(endpoint, ''), {DAY}, provider, model_name, count(*),"
        " count(*) FILTER (WHERE status = 'success'),"
        " coalesce(sum(input_tokens) FILTER (WHERE status = 'success'), 0),"
        " coalesce(sum(output_tokens) FILTER (WHERE status = 'success'), 0),"
        " coalesce(sum(estimated_cost_usd), 0),"
        " count(*) FILTER (WHERE estimated_cost_usd IS NULL)"
        " FROM model_usage_stats WHERE tenant_id = $1 GROUP BY 1, 2, 3, 4",
    ),
    "latency_daily": (
        "SELECT endpoint, day, provider, model_name, bucket, successes"
        " FROM model_usage_latency_daily WHERE tenant_id = $1",
        f"SELECT coalesce(endpoint, ''), {DAY}, provider, model_name, {BUCKET}, count(*)"
        " FROM model_usage_stats WHERE tenant_id = $1 AND status = 'success'"
        " GROUP BY 1, 2, 3, 4, 5",
    ),
    "tag_daily": (
        "SELECT tag, day, requests, errors, cost_usd FROM model_usage_tag_daily"
        " WHERE tenant_id = $1",
        f"SELECT tag, {DAY}, count(*), count(*) FILTER (WHERE status <> 'success'),"
        " coalesce(sum(estimated_cost_usd), 0)"
        " FROM model_usage_stats CROSS JOIN LATERAL unnest(tags) AS tag"
        " WHERE tenant_id = $1 GROUP BY 1, 2",
    ),
}


async def insert(
    pg: asyncpg.Connection, tenant: uuid.UUID, when: datetime, n: int, seed: int
) -> None:
    """``n`` rows at ``when`` + i seconds: two users (one NULL), two endpoints, three models
    (one unpriced), 1 in 5 failing, tags on most."""
    await pg.execute(
        """
        INSERT INTO model_usage_stats (id, tenant_id, user_id, provider, model_name, endpoint,
            input_tokens, output_tokens, latency_ms, estimated_cost_usd, status, "timestamp",
            tags)
        SELECT gen_random_uuid(), $1,
               CASE WHEN (i + $4) % 3 = 0 THEN NULL ELSE 'u' || ((i + $4) % 2) END,
               (ARRAY['openai', 'openai', 'groq'])[1 + (i + $4) % 3],
               (ARRAY['rollup-test-a', 'rollup-test-b', 'mystery'])[1 + (i + $4) % 3],
               CASE WHEN i % 4 = 0 THEN NULL ELSE '/e' || (i % 2) END,
               CASE WHEN i % 5 = 0 THEN NULL ELSE 100 + i END,
               CASE WHEN i % 5 = 0 THEN NULL ELSE 10 + i END,
               50 + 37 * i,
               CASE WHEN (i + $4) % 3 = 2 OR i % 5 = 0 THEN NULL ELSE 0.001 * (i + 1) END,
               CASE WHEN i % 5 = 0 THEN 'error' ELSE 'success' END,
               $2::timestamptz + i * interval '1 second',
               CASE WHEN i % 3 = 0 THEN NULL WHEN i % 3 = 1 THEN ARRAY['a']
                    ELSE ARRAY['a', 'b'] END
        FROM generate_series(0, $3 - 1) AS i
        """,
        tenant,
        when,
        n,
        seed,
    )


async def assert_rollups_match_raw(pg: asyncpg.Connection, tenant: uuid.UUID) -> None:
    for name, (rollup, raw) in PAIRS.items():
        got = sorted(tuple(r) for r in await pg.fetch(rollup, tenant))
        want = sorted(tuple(r) for r in await pg.fetch(raw, tenant))
        assert got == want, name
    # The largest prompt + answer only ever grows (a max cannot be taken back by difference).
    lower = await pg.fetchval(
        "SELECT count(*) FROM model_usage_endpoint_daily e WHERE tenant_id = $1"
        " AND max_total_tokens IS DISTINCT FROM (SELECT greatest(max(total_tokens),"
        " e.max_total_tokens) FROM model_usage_stats s WHERE s.tenant_id = $1"
        " AND coalesce(s.endpoint, '') = e.endpoint AND s.model_name = e.model_name"
        " AND (s.\"timestamp\" AT TIME ZONE 'UTC')::date = e.day)",
        tenant,
    )
    assert lower == 0


async def test_rollups_follow_raw_rows_through_both_refresh_paths(pg: asyncpg.Connection) -> None:
    tenant = uuid.uuid4()
    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    old = this_hour - timedelta(days=3)  # before the working set: whole-day path
    recent = [this_hour - timedelta(hours=2), this_hour - timedelta(hours=1), this_hour]
    await insert(pg, tenant, old, 30, 0)
    for k, hour in enumerate(recent):
        await insert(pg, tenant, hour, 20, k)
    await pg.execute(REFRESH, old, this_hour + timedelta(hours=1))
    await assert_rollups_match_raw(pg, tenant)
    kept = "SELECT count(*) FROM model_usage_recent WHERE tenant_id = $1 AND hour = $2"
    assert await pg.fetchval(kept, tenant, recent[0]) > 0  # recent hours are in the working set
    assert await pg.fetchval(kept, tenant, old) == 0

    # By difference: late rows, vanished rows, and a group emptied to nothing.
    await insert(pg, tenant, recent[1] + timedelta(minutes=30), 7, 5)
    await pg.execute(
        'DELETE FROM model_usage_stats WHERE tenant_id = $1 AND "timestamp" >= $2'
        " AND \"timestamp\" < $2 + interval '10 seconds'",
        tenant,
        recent[0],
    )
    await pg.execute(
        'DELETE FROM model_usage_stats WHERE tenant_id = $1 AND "timestamp" >= $2'
        " AND \"timestamp\" < $2 + interval '1 hour' AND model_name = 'mystery'",
        tenant,
        this_hour,
    )
    await pg.execute(REFRESH, recent[0], this_hour + timedelta(hours=1))
    await assert_rollups_match_raw(pg, tenant)
    await pg.execute(REFRESH, recent[0], this_hour + timedelta(hours=1))  # a re-run is harmless
    await assert_rollups_match_raw(pg, tenant)

    # A late row in an old hour (a spool replay): its day is recomputed from raw rows.
    await insert(pg, tenant, old + timedelta(minutes=45), 3, 1)
    await pg.execute(REFRESH, old, old + timedelta(hours=1))
    await assert_rollups_match_raw(pg, tenant)

    await pg.execute("DELETE FROM model_usage_stats WHERE tenant_id = $1", tenant)
    await pg.execute(REFRESH, old, this_hour + timedelta(hours=1))
    await assert_rollups_match_raw(pg, tenant)
    assert (
        await pg.fetchval("SELECT count(*) FROM model_usage_recent WHERE tenant_id = $1", tenant)
        == 0
    )


async def test_reports_by_user_endpoint_and_tag_equal_the_raw_rows(
    pg: asyncpg.Connection, pg_dsn: str
) -> None:
    tenant = uuid.uuid4()
    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    since = this_hour - timedelta(days=2)
    await insert(pg, tenant, this_hour - timedelta(days=4), 10, 0)  # before the window's day
    await insert(pg, tenant, since + timedelta(hours=1), 25, 1)
    await insert(pg, tenant, this_hour, 15, 2)
    await pg.execute(REFRESH, this_hour - timedelta(days=5), this_hour + timedelta(hours=1))
    day0 = datetime.combine(since.date(), datetime.min.time(), UTC)  # reports start at a day
    raw = {
        "user": "coalesce(user_id, '')",
        "endpoint": "coalesce(endpoint, '')",
        "tag": "tag",
    }
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    assert pool is not None
    try:
        for by, key in raw.items():
            got = await usage_report(pool, since=since, by=by, tenant_id=tenant)  # type: ignore[arg-type]
            want = await pg.fetch(
                f"SELECT {key} AS key, count(*) AS n, coalesce(sum(input_tokens), 0) AS tin,"
                " coalesce(sum(estimated_cost_usd), 0) AS cost,"
                " count(*) FILTER (WHERE status <> 'success') AS errors FROM model_usage_stats"
                + (" CROSS JOIN LATERAL unnest(tags) AS tag" if by == "tag" else "")
                + ' WHERE tenant_id = $1 AND "timestamp" >= $2 GROUP BY 1',
                tenant,
                day0,
            )
            assert sorted(
                (r.key, r.requests, r.input_tokens, r.cost_usd, r.errors) for r in got
            ) == sorted(
                (r["key"], r["n"], r["tin"], Decimal(r["cost"]), r["errors"]) for r in want
            ), by
    finally:
        await pool.close()
