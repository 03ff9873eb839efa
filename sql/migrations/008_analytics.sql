-- 008: analytics. Sessions and tags on every usage row, a per-user daily rollup, a per-tenant
-- hourly series for anomaly detection, the monthly usage views and the anomaly function.
-- Idempotent (IF NOT EXISTS / OR REPLACE). All hours, days and months are UTC.
--
-- Why a separate per-user rollup instead of user_id in model_usage_hourly's key: with
-- user_id in it the hourly rollup stops compressing (a tenant with many users has about one
-- rollup row per request) and every tenant-level query that reads it slows down in proportion.
-- Per-user questions are monthly, so model_usage_user_daily keeps one row per tenant, UTC day,
-- user, provider, model and status; its cost (rows, size, refresh time) is printed by
-- bench/bench_queries.py and quoted in the README.
--
-- Edited in place: the text first merged back-filled these rollups inside the migration. A
-- database that applied it is as current as one that applies this text (009 then 012 back-fill
-- whatever is marked), so `llm-gateway db status` counts it as applied:
-- earlier-checksums: 9cd3338d31daf116

-- ---------------------------------------------------------------------------------------------
-- Sessions and tags
-- ---------------------------------------------------------------------------------------------
-- NULL when the request carried none. The SDK validates both (usage/analytics/labels.py); no
-- CHECK here, for the same reason as status: a usage row is never refused.
ALTER TABLE model_usage_stats ADD COLUMN IF NOT EXISTS session_id text;
ALTER TABLE model_usage_stats ADD COLUMN IF NOT EXISTS tags text[];

-- Cost per session: one index range per (tenant, session).
CREATE INDEX IF NOT EXISTS model_usage_stats_session
    ON model_usage_stats (tenant_id, session_id, "timestamp")
    INCLUDE (estimated_cost_usd, input_tokens, output_tokens, status)
    WHERE session_id IS NOT NULL;
-- The most expensive sessions of a period: index-only scan of the tenant's period.
CREATE INDEX IF NOT EXISTS model_usage_stats_session_time
    ON model_usage_stats (tenant_id, "timestamp")
    INCLUDE (session_id, estimated_cost_usd)
    WHERE session_id IS NOT NULL;
-- Rows carrying a given tag (tags @> ARRAY['x']).
CREATE INDEX IF NOT EXISTS model_usage_stats_tags
    ON model_usage_stats USING gin (tags)
    WHERE tags IS NOT NULL;
-- Spend by tag per day: index-only scan of the tenant's tagged rows in the period.
CREATE INDEX IF NOT EXISTS model_usage_stats_tagged_time
    ON model_usage_stats (tenant_id, "timestamp")
    INCLUDE (tags, estimated_cost_usd)
    WHERE tags IS NOT NULL;

-- ---------------------------------------------------------------------------------------------
-- Rollups
-- ---------------------------------------------------------------------------------------------

-- One row per tenant, UTC day, user ('' = no user), provider, model and status.
CREATE TABLE IF NOT EXISTS model_usage_user_daily (
    tenant_id         uuid    NOT NULL,
    user_id           text    NOT NULL,
    day               date    NOT NULL,
    provider          text    NOT NULL,
    model_name        text    NOT NULL,
    status            text    NOT NULL,
    requests          bigint  NOT NULL,
    input_tokens      bigint,
    output_tokens     bigint,
    total_tokens      bigint,
    cost_usd          numeric,
    unpriced_requests bigint  NOT NULL,
    latency_ms_sum    bigint  NOT NULL,
    refreshed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id, day, provider, model_name, status)
);
COMMENT ON TABLE model_usage_user_daily IS
    'Daily (UTC) rollup of model_usage_stats per tenant, user, provider, model and status '
    '(user_id '''' = rows without a user); recomputed by llm_gateway_refresh_usage_hourly().';
CREATE INDEX IF NOT EXISTS model_usage_user_daily_day ON model_usage_user_daily (day);

-- One row per tenant and UTC hour with traffic: the series the anomaly detector reads.
CREATE TABLE IF NOT EXISTS model_usage_tenant_hourly (
    tenant_id    uuid        NOT NULL,
    hour         timestamptz NOT NULL,
    requests     bigint      NOT NULL,
    errors       bigint      NOT NULL,  -- attempts whose status is not 'success'
    cost_usd     numeric     NOT NULL,  -- unpriced rows count 0
    refreshed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, hour)
);
COMMENT ON TABLE model_usage_tenant_hourly IS
    'Per tenant and UTC hour: requests, errors, cost; derived from model_usage_hourly.';
CREATE INDEX IF NOT EXISTS model_usage_tenant_hourly_hour ON model_usage_tenant_hourly (hour);

-- Anomalies already announced by the maintenance check (one NOTIFY each).
CREATE TABLE IF NOT EXISTS model_usage_anomalies_seen (
    tenant_id  uuid        NOT NULL,
    hour       timestamptz NOT NULL,
    metric     text        NOT NULL,
    observed   double precision NOT NULL,
    expected   double precision NOT NULL,
    score      double precision NOT NULL,
    noticed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, hour, metric)
);

-- Recomputes the new rollups for [from_ts, to_ts): the tenant series for those hours (from
-- model_usage_hourly, which must be fresh), the user rollup for the whole UTC days they touch
-- (from the raw rows: a day is recomputed, never incremented, like the hourly rollup).
CREATE OR REPLACE FUNCTION llm_gateway_refresh_usage_analytics(from_ts timestamptz,
                                                               to_ts timestamptz)
RETURNS bigint
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    lo      timestamptz := date_trunc('hour', from_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    hi      timestamptz := date_trunc('hour', to_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    day_lo  date;
    day_hi  date;
    n_hours bigint;
    n_users bigint;
BEGIN
    IF hi < to_ts THEN
        hi := hi + interval '1 hour';
    END IF;
    day_lo := (lo AT TIME ZONE 'UTC')::date;
    day_hi := ((hi - interval '1 microsecond') AT TIME ZONE 'UTC')::date + 1;
    PERFORM pg_advisory_xact_lock(hashtext('llm_gateway_refresh_usage_analytics'));

    WITH fresh AS MATERIALIZED (
        SELECT tenant_id, hour, sum(requests)::bigint AS requests,
               (sum(requests) FILTER (WHERE status <> 'success'))::bigint AS errors,
               coalesce(sum(cost_usd), 0) AS cost_usd
        FROM model_usage_hourly
        WHERE hour >= lo AND hour < hi
        GROUP BY 1, 2
    ),
    upserted AS (
        INSERT INTO model_usage_tenant_hourly AS t (tenant_id, hour, requests, errors, cost_usd)
        SELECT tenant_id, hour, requests, coalesce(errors, 0), cost_usd FROM fresh
        ON CONFLICT (tenant_id, hour) DO UPDATE
        SET requests = EXCLUDED.requests, errors = EXCLUDED.errors,
            cost_usd = EXCLUDED.cost_usd, refreshed_at = now()
        WHERE (t.requests, t.errors, t.cost_usd)
              IS DISTINCT FROM (EXCLUDED.requests, EXCLUDED.errors, EXCLUDED.cost_usd)
        RETURNING 1
    ),
    vanished AS (
        DELETE FROM model_usage_tenant_hourly t
        WHERE t.hour >= lo AND t.hour < hi
          AND NOT EXISTS (SELECT 1 FROM fresh f
                          WHERE f.tenant_id = t.tenant_id AND f.hour = t.hour)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upserted) + (SELECT count(*) FROM vanished) INTO n_hours;

    WITH fresh AS MATERIALIZED (
        SELECT tenant_id, coalesce(user_id, '') AS user_id,
               ("timestamp" AT TIME ZONE 'UTC')::date AS day,
               provider, model_name, status,
               count(*)                                           AS requests,
               sum(input_tokens)                                  AS input_tokens,
               sum(output_tokens)                                 AS output_tokens,
               sum(total_tokens)                                  AS total_tokens,
               sum(estimated_cost_usd)                            AS cost_usd,
               count(*) FILTER (WHERE estimated_cost_usd IS NULL) AS unpriced_requests,
               sum(latency_ms)                                    AS latency_ms_sum
        FROM model_usage_stats
        WHERE "timestamp" >= day_lo::timestamp AT TIME ZONE 'UTC'
          AND "timestamp" < day_hi::timestamp AT TIME ZONE 'UTC'
        GROUP BY 1, 2, 3, 4, 5, 6
    ),
    upserted AS (
        INSERT INTO model_usage_user_daily AS u
            (tenant_id, user_id, day, provider, model_name, status, requests, input_tokens,
             output_tokens, total_tokens, cost_usd, unpriced_requests, latency_ms_sum)
        SELECT * FROM fresh
        ON CONFLICT (tenant_id, user_id, day, provider, model_name, status) DO UPDATE
        SET requests = EXCLUDED.requests,
            input_tokens = EXCLUDED.input_tokens,
            output_tokens = EXCLUDED.output_tokens,
            total_tokens = EXCLUDED.total_tokens,
            cost_usd = EXCLUDED.cost_usd,
            unpriced_requests = EXCLUDED.unpriced_requests,
            latency_ms_sum = EXCLUDED.latency_ms_sum,
            refreshed_at = now()
        WHERE (u.requests, u.input_tokens, u.output_tokens, u.cost_usd, u.latency_ms_sum)
              IS DISTINCT FROM
              (EXCLUDED.requests, EXCLUDED.input_tokens, EXCLUDED.output_tokens,
               EXCLUDED.cost_usd, EXCLUDED.latency_ms_sum)
        RETURNING 1
    ),
    vanished AS (
        DELETE FROM model_usage_user_daily u
        WHERE u.day >= day_lo AND u.day < day_hi
          AND NOT EXISTS (SELECT 1 FROM fresh f
                          WHERE f.tenant_id = u.tenant_id AND f.user_id = u.user_id
                            AND f.day = u.day AND f.provider = u.provider
                            AND f.model_name = u.model_name AND f.status = u.status)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upserted) + (SELECT count(*) FROM vanished) INTO n_users;
    RETURN n_hours + n_users;
END $$;

-- The hourly refresh of 002 renamed, so the new one can call it and then the analytics
-- rollups: every caller (maintenance, the writer's replay refresh) keeps its one entry point.
DO $$
BEGIN
    IF to_regprocedure('llm_gateway_refresh_usage_hourly_base(timestamptz, timestamptz)')
       IS NULL THEN
        ALTER FUNCTION llm_gateway_refresh_usage_hourly(timestamptz, timestamptz)
            RENAME TO llm_gateway_refresh_usage_hourly_base;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION llm_gateway_refresh_usage_hourly(from_ts timestamptz,
                                                            to_ts timestamptz)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    written bigint;
BEGIN
    written := llm_gateway_refresh_usage_hourly_base(from_ts, to_ts);
    -- After the hourly rollup, which the tenant series is derived from. The count returned
    -- stays that of model_usage_hourly and model_usage_daily_totals, as documented in 002.
    PERFORM llm_gateway_refresh_usage_analytics(from_ts, to_ts);
    RETURN written;
END $$;

-- Rows written before this migration are not rolled up here (at 10 M rows that took 12
-- minutes in one transaction): 009 marks every day with rows, and 012's batched back-fill
-- (llm_gateway_backfill_usage_analytics, through llm_gateway_refresh_usage_analytics) fills
-- these rollups with 009's, a few days per call.

-- ---------------------------------------------------------------------------------------------
-- Monthly usage
-- ---------------------------------------------------------------------------------------------

-- Per tenant, UTC month, provider and model (from the hourly rollup).
CREATE OR REPLACE VIEW tenant_monthly_usage AS
SELECT tenant_id,
       (date_trunc('month', hour AT TIME ZONE 'UTC'))::date AS month,
       provider,
       model_name,
       sum(requests)::bigint                                          AS requests,
       sum(input_tokens)::bigint                                      AS input_tokens,
       sum(output_tokens)::bigint                                     AS output_tokens,
       sum(cost_usd)                                                  AS cost_usd,
       coalesce(sum(requests) FILTER (WHERE status <> 'success'), 0)::bigint AS errors,
       sum(unpriced_requests)::bigint                                 AS unpriced_requests
FROM model_usage_hourly
GROUP BY 1, 2, 3, 4;
COMMENT ON VIEW tenant_monthly_usage IS
    'Monthly (UTC) usage per tenant, provider and model; errors = attempts not ''success''. '
    'Filter on tenant_id and month.';

-- Per tenant, user (NULL = rows without a user), UTC month, provider and model.
CREATE OR REPLACE VIEW tenant_user_monthly_usage AS
SELECT tenant_id,
       NULLIF(user_id, '')                                            AS user_id,
       (date_trunc('month', day))::date                               AS month,
       provider,
       model_name,
       sum(requests)::bigint                                          AS requests,
       sum(input_tokens)::bigint                                      AS input_tokens,
       sum(output_tokens)::bigint                                     AS output_tokens,
       sum(cost_usd)                                                  AS cost_usd,
       coalesce(sum(requests) FILTER (WHERE status <> 'success'), 0)::bigint AS errors,
       sum(unpriced_requests)::bigint                                 AS unpriced_requests
FROM model_usage_user_daily
GROUP BY tenant_id, user_id, 3, 4, 5;
COMMENT ON VIEW tenant_user_monthly_usage IS
    'Monthly (UTC) usage per tenant, user, provider and model. Filter on tenant_id, user_id '
    'and month.';

-- ---------------------------------------------------------------------------------------------
-- Anomalies
-- ---------------------------------------------------------------------------------------------

-- Median and median absolute deviation of a few samples (NULLs ignored).
CREATE OR REPLACE FUNCTION llm_gateway_median_mad(samples double precision[],
                                                  OUT median double precision,
                                                  OUT mad double precision)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    WITH m AS (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) AS med
               FROM unnest(samples) AS x WHERE x IS NOT NULL)
    SELECT m.med,
           (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY abs(x - m.med))
            FROM unnest(samples) AS x WHERE x IS NOT NULL)
    FROM m
$$;

-- Per tenant and complete UTC hour in [since, the hour of as_of): requests, cost and error rate
-- against the tenant's own baseline for that hour of the week.
--
-- Baseline: the same hour 1, 2, 3 and 4 weeks earlier (an hour without rows counts as zero),
-- from the tenant's first hour on. A tenant with fewer than 2 such weeks falls back to the
-- same hour on the previous 1..6 days (at least 3 needed; else the hour is not scored).
-- expected = median of the samples; score = |observed - expected| / scale, with
--   requests:   scale = max(1.4826 * MAD, 0.15 * expected, sqrt(expected), 1)
--   cost:       scale = max(1.4826 * MAD, 0.15 * expected, 0.01 USD)
--   error_rate: scale = max(1.4826 * MAD, 0.02, sqrt(p (1 - p) / requests)), upward only,
--               scored from 10 requests and 5 errors above the expected count in the hour.
-- Requests and cost are scored when the observed or expected requests reach min_requests,
-- so a tenant with a few requests a week is not noise. Candidate hours are the hours with
-- rows, plus the hours that had rows a week earlier (a drop to zero has no row).
CREATE OR REPLACE FUNCTION llm_gateway_usage_anomalies(
    since        timestamptz,
    only_tenant  uuid DEFAULT NULL,
    min_score    double precision DEFAULT 4,
    min_requests double precision DEFAULT 5,
    as_of        timestamptz DEFAULT now()
) RETURNS TABLE (tenant_id uuid, hour timestamptz, metric text, observed double precision,
                 expected double precision, score double precision)
LANGUAGE sql STABLE SET jit = off AS $$
WITH bounds AS (
    SELECT date_trunc('hour', since AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS lo,
           date_trunc('hour', coalesce(as_of, now()) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hi
),
-- The tenant filter is in separate branches: the plan is generic (only_tenant unknown when it
-- is made), and "only_tenant IS NULL OR tenant_id = only_tenant" would scan every tenant.
series AS (
    SELECT t.tenant_id, t.hour
    FROM model_usage_tenant_hourly t, bounds b
    WHERE only_tenant IS NULL AND t.hour >= b.lo - interval '7 days' AND t.hour < b.hi
    UNION ALL
    SELECT t.tenant_id, t.hour
    FROM model_usage_tenant_hourly t, bounds b
    WHERE t.tenant_id = only_tenant AND t.hour >= b.lo - interval '7 days' AND t.hour < b.hi
),
-- Hours with rows, and hours that had rows a week earlier (a drop to zero has no row).
candidates AS (
    SELECT DISTINCT c.tenant_id, c.hour
    FROM bounds b,
         LATERAL (SELECT s.tenant_id, s.hour FROM series s WHERE s.hour >= b.lo
                  UNION ALL
                  SELECT s.tenant_id, s.hour + interval '7 days' FROM series s
                  WHERE s.hour < b.hi - interval '7 days') AS c
),
first_seen AS (
    SELECT f.tenant_id,
           (SELECT min(t.hour) FROM model_usage_tenant_hourly t
            WHERE t.tenant_id = f.tenant_id) AS first_hour
    FROM (SELECT DISTINCT c.tenant_id FROM candidates c) AS f
),
samples AS (
    SELECT c.tenant_id, c.hour,
           coalesce(o.requests, 0)::float8 AS obs_requests,
           coalesce(o.errors, 0)::float8 AS obs_errors,
           coalesce(o.cost_usd, 0)::float8 AS obs_cost,
           s.kind, s.requests, s.cost, s.error_rate
    FROM candidates c
    JOIN first_seen fs USING (tenant_id)
    LEFT JOIN model_usage_tenant_hourly o ON o.tenant_id = c.tenant_id AND o.hour = c.hour
    CROSS JOIN LATERAL (
        WITH lagged AS (
            SELECT k.kind, k.back, coalesce(p.requests, 0)::float8 AS requests,
                   coalesce(p.cost_usd, 0)::float8 AS cost,
                   p.errors::float8 / nullif(p.requests, 0) AS error_rate
            FROM (SELECT 'week' AS kind, w * interval '7 days' AS back
                  FROM generate_series(1, 4) AS w
                  UNION ALL
                  SELECT 'day', d * interval '1 day' FROM generate_series(1, 6) AS d) AS k
            LEFT JOIN model_usage_tenant_hourly p
                   ON p.tenant_id = c.tenant_id AND p.hour = c.hour - k.back
            WHERE c.hour - k.back >= fs.first_hour
        ),
        chosen AS (
            SELECT CASE WHEN count(*) FILTER (WHERE kind = 'week') >= 2 THEN 'week'
                        WHEN count(*) FILTER (WHERE kind = 'day') >= 3 THEN 'day' END AS kind
            FROM lagged
        )
        SELECT ch.kind,
               array_agg(l.requests) AS requests,
               array_agg(l.cost) AS cost,
               array_agg(l.error_rate) AS error_rate
        FROM chosen ch JOIN lagged l ON l.kind = ch.kind
        GROUP BY ch.kind
    ) AS s
),
scored AS (
    SELECT sa.tenant_id, sa.hour, 'requests' AS metric, sa.obs_requests AS observed,
           r.median AS expected,
           abs(sa.obs_requests - r.median)
               / greatest(1.4826 * r.mad, 0.15 * r.median, sqrt(r.median), 1) AS score,
           greatest(sa.obs_requests, r.median) >= min_requests AS eligible
    FROM samples sa, llm_gateway_median_mad(sa.requests) r
    UNION ALL
    SELECT sa.tenant_id, sa.hour, 'cost', sa.obs_cost, r.median,
           abs(sa.obs_cost - r.median) / greatest(1.4826 * r.mad, 0.15 * r.median, 0.01),
           greatest(sa.obs_requests, rq.median) >= min_requests
    FROM samples sa, llm_gateway_median_mad(sa.cost) r, llm_gateway_median_mad(sa.requests) rq
    UNION ALL
    SELECT sa.tenant_id, sa.hour, 'error_rate', sa.obs_errors / sa.obs_requests, r.median,
           (sa.obs_errors / sa.obs_requests - r.median)
               / greatest(1.4826 * r.mad, 0.02,
                          sqrt(greatest(r.median, 0.01) * (1 - least(r.median, 0.99))
                               / sa.obs_requests)),
           sa.obs_requests >= 10 AND r.median IS NOT NULL
               AND sa.obs_errors - r.median * sa.obs_requests >= 5
    FROM samples sa, llm_gateway_median_mad(sa.error_rate) r
    WHERE sa.obs_requests > 0
)
SELECT s.tenant_id, s.hour, s.metric, s.observed, s.expected, s.score
FROM scored s
WHERE s.eligible AND s.score >= min_score
ORDER BY s.hour, s.tenant_id, s.metric
$$;
COMMENT ON FUNCTION llm_gateway_usage_anomalies(timestamptz, uuid, double precision,
                                                double precision, timestamptz) IS
    'Hourly cost, requests and error-rate anomalies per tenant against its hour-of-week '
    'baseline (median/MAD of the last 4 weeks); the current hour is not scored.';

-- Scheduled check: new anomalies of the last `lookback` are remembered and announced with
-- one NOTIFY llm_gateway_events each (payload: JSON with kind = 'usage_anomaly').
-- Run it from maintenance or pg_cron, e.g. every hour a few minutes past the hour.
CREATE OR REPLACE FUNCTION llm_gateway_notify_usage_anomalies(
    lookback interval DEFAULT interval '3 hours',
    min_score double precision DEFAULT 4
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    a record;
    n integer := 0;
BEGIN
    FOR a IN
        INSERT INTO model_usage_anomalies_seen AS s
            (tenant_id, hour, metric, observed, expected, score)
        SELECT x.tenant_id, x.hour, x.metric, x.observed, x.expected, x.score
        FROM llm_gateway_usage_anomalies(now() - lookback, NULL, min_score) x
        ON CONFLICT (tenant_id, hour, metric) DO NOTHING
        RETURNING s.*
    LOOP
        PERFORM pg_notify('llm_gateway_events', json_build_object(
            'kind', 'usage_anomaly', 'tenant_id', a.tenant_id, 'hour', a.hour,
            'metric', a.metric, 'observed', a.observed, 'expected', a.expected,
            'score', round(a.score::numeric, 2))::text);
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;
