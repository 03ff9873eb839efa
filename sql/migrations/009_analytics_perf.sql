-- 009: analytics at scale. Every analytics answer is read from a small rollup, and keeping the
-- rollups fresh costs a maintenance run about what it did before 008. Idempotent. UTC.
--
-- * Incremental refresh. 008 recomputed the per-user rollup from the raw rows of whole UTC
--   days (~1.6 s a run at 10 M rows). Now the recent hours are kept at fine grain in
--   model_usage_recent (yesterday and today only); a refresh recomputes its hours there and
--   adds the *difference* to the daily rollups, so a run touches only the groups whose hours
--   changed. Invariant: for every hour >= usage_analytics_staged_from, what the daily rollups
--   hold for that hour equals what model_usage_recent holds for it. A refresh reaching before
--   that point (a spool replay, a back-fill) recomputes its whole days from the raw rows.
-- * Rollups per dimension a report groups by: model_usage_user_day (by user),
--   model_usage_endpoint_daily (by endpoint; the recommendations' token mix and success rate),
--   model_usage_latency_daily (a latency histogram, buckets 15 % wide, for p50/p95) and
--   model_usage_tag_daily (by tag).
-- * Precomputed anomaly baselines: the median/MAD of each (tenant, hour) are computed once,
--   when maintenance first refreshes that hour, instead of ten lookups per tenant-hour at query
--   time. Hours outside the covered range are still scored, computing baselines on the fly.
-- * Maintenance announces new anomalies (NOTIFY llm_gateway_events, type usage_anomaly).
-- * The rows already there are rolled up after the migration, in batches (012), not in it.
--
-- Edited in place: the text first merged back-filled inside the migration. A database that
-- applied it is as current as one that applies this text (its rollups were back-filled; 012
-- finds nothing marked), so `llm-gateway db status` counts it as applied:
-- earlier-checksums: 3b7ebee565923aa3

INSERT INTO llm_gateway_settings (key, value, description) VALUES
    ('usage_analytics_staged_from', NULL,
     'State: model_usage_recent holds every hour from this instant on; older hours of the '
     'daily analytics rollups are recomputed from raw rows when refreshed.'),
    ('usage_baselines_covered_from', NULL,
     'State: anomaly baselines are precomputed for every candidate hour in '
     '[usage_baselines_covered_from, usage_baselines_covered_to).'),
    ('usage_baselines_covered_to', NULL, 'State: see usage_baselines_covered_from.'),
    ('usage_anomaly_notify', 'on',
     'on: llm_gateway_maintain_usage() sends NOTIFY llm_gateway_events once per new anomaly '
     'of the last 3 hours (llm_gateway_notify_usage_anomalies). off: it does not.')
ON CONFLICT (key) DO NOTHING;

-- ---------------------------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------------------------

-- Recent hours at the finest grain the daily rollups need. bucket: the latency bucket of a
-- successful attempt (latency_ms in [1.15^b, 1.15^(b+1))), -1 for other statuses.
CREATE TABLE IF NOT EXISTS model_usage_recent (
    hour              timestamptz NOT NULL,
    tenant_id         uuid        NOT NULL,
    user_id           text        NOT NULL,  -- '' = none
    endpoint          text        NOT NULL,  -- '' = none
    provider          text        NOT NULL,
    model_name        text        NOT NULL,
    status            text        NOT NULL,
    tags              text[]      NOT NULL,  -- '{}' = none
    bucket            smallint    NOT NULL,
    requests          bigint      NOT NULL,
    input_tokens      bigint,
    output_tokens     bigint,
    total_tokens      bigint,
    cost_usd          numeric,
    unpriced_requests bigint      NOT NULL,
    latency_ms_sum    bigint      NOT NULL,
    max_total_tokens  integer,
    PRIMARY KEY (hour, tenant_id, user_id, endpoint, provider, model_name, status, tags, bucket)
);
COMMENT ON TABLE model_usage_recent IS
    'Working set of the incremental analytics refresh (yesterday and today, UTC); not a report '
    'source.';

CREATE TABLE IF NOT EXISTS model_usage_user_day (
    tenant_id         uuid    NOT NULL,
    day               date    NOT NULL,
    user_id           text    NOT NULL,  -- '' = rows without a user
    requests          bigint  NOT NULL,
    errors            bigint  NOT NULL,
    input_tokens      bigint  NOT NULL,
    output_tokens     bigint  NOT NULL,
    cost_usd          numeric NOT NULL,  -- priced rows only
    unpriced_requests bigint  NOT NULL,
    -- Covering: a tenant's days are read by an index-only scan, not from heap pages that
    -- hold every tenant's rows of the day.
    PRIMARY KEY (tenant_id, day, user_id)
        INCLUDE (requests, errors, input_tokens, output_tokens, cost_usd, unpriced_requests)
);
COMMENT ON TABLE model_usage_user_day IS 'Per tenant, UTC day and user: totals (report by user).';

CREATE TABLE IF NOT EXISTS model_usage_endpoint_daily (
    tenant_id         uuid    NOT NULL,
    day               date    NOT NULL,
    endpoint          text    NOT NULL,  -- '' = none
    provider          text    NOT NULL,
    model_name        text    NOT NULL,
    requests          bigint  NOT NULL,
    successes         bigint  NOT NULL,
    input_tokens      bigint  NOT NULL,
    output_tokens     bigint  NOT NULL,
    ok_input_tokens   bigint  NOT NULL,  -- successful attempts only: the token mix
    ok_output_tokens  bigint  NOT NULL,
    cost_usd          numeric NOT NULL,
    unpriced_requests bigint  NOT NULL,
    max_total_tokens  integer,           -- never lowered by a refresh (a max has no inverse)
    PRIMARY KEY (tenant_id, day, endpoint, provider, model_name)
        INCLUDE (requests, successes, input_tokens, output_tokens, ok_input_tokens,
                 ok_output_tokens, cost_usd, unpriced_requests, max_total_tokens)
);
COMMENT ON TABLE model_usage_endpoint_daily IS
    'Per tenant, UTC day, endpoint, provider and model (report by endpoint, recommendations).';

CREATE TABLE IF NOT EXISTS model_usage_latency_daily (
    tenant_id  uuid     NOT NULL,
    day        date     NOT NULL,
    endpoint   text     NOT NULL,
    provider   text     NOT NULL,
    model_name text     NOT NULL,
    bucket     smallint NOT NULL,
    successes  bigint   NOT NULL,
    PRIMARY KEY (tenant_id, day, endpoint, provider, model_name, bucket) INCLUDE (successes)
);
COMMENT ON TABLE model_usage_latency_daily IS
    'Latency histogram of successful attempts; bucket b holds [1.15^b, 1.15^(b+1)) ms.';

CREATE TABLE IF NOT EXISTS model_usage_tag_daily (
    tenant_id         uuid    NOT NULL,
    day               date    NOT NULL,
    tag               text    NOT NULL,
    requests          bigint  NOT NULL,
    errors            bigint  NOT NULL,
    input_tokens      bigint  NOT NULL,
    output_tokens     bigint  NOT NULL,
    cost_usd          numeric NOT NULL,
    unpriced_requests bigint  NOT NULL,
    PRIMARY KEY (tenant_id, day, tag)
        INCLUDE (requests, errors, input_tokens, output_tokens, cost_usd, unpriced_requests)
);
COMMENT ON TABLE model_usage_tag_daily IS
    'Per tenant, UTC day and tag (a row with two tags counts in both).';

-- A difference can bring a group to zero: those rows are found through these, and deleted.
CREATE INDEX IF NOT EXISTS model_usage_user_daily_zero ON model_usage_user_daily (day)
    WHERE requests = 0;
CREATE INDEX IF NOT EXISTS model_usage_user_day_zero ON model_usage_user_day (day)
    WHERE requests = 0;
CREATE INDEX IF NOT EXISTS model_usage_endpoint_daily_zero ON model_usage_endpoint_daily (day)
    WHERE requests = 0;
CREATE INDEX IF NOT EXISTS model_usage_latency_daily_zero ON model_usage_latency_daily (day)
    WHERE successes = 0;
CREATE INDEX IF NOT EXISTS model_usage_tag_daily_zero ON model_usage_tag_daily (day)
    WHERE requests = 0;
-- Whole-day recomputes and retention find days through these.
CREATE INDEX IF NOT EXISTS model_usage_user_day_day ON model_usage_user_day (day);
CREATE INDEX IF NOT EXISTS model_usage_endpoint_daily_day ON model_usage_endpoint_daily (day);
CREATE INDEX IF NOT EXISTS model_usage_latency_daily_day ON model_usage_latency_daily (day);
CREATE INDEX IF NOT EXISTS model_usage_tag_daily_day ON model_usage_tag_daily (day);

-- One row per tenant and hour scored (kind NULL: too young to be scored).
CREATE TABLE IF NOT EXISTS model_usage_tenant_baseline (
    hour        timestamptz NOT NULL,
    tenant_id   uuid        NOT NULL,
    kind        text,
    req_median  double precision,
    req_mad     double precision,
    cost_median double precision,
    cost_mad    double precision,
    err_median  double precision,
    err_mad     double precision,
    PRIMARY KEY (hour, tenant_id)
);
CREATE INDEX IF NOT EXISTS model_usage_tenant_baseline_tenant
    ON model_usage_tenant_baseline (tenant_id, hour);

-- ---------------------------------------------------------------------------------------------
-- Baselines
-- ---------------------------------------------------------------------------------------------

-- The baseline of one tenant-hour, as 008 defined it: the same hour 1-4 weeks earlier (2 at
-- least), else 1-6 days earlier (3 at least), from the tenant's first hour on; kind NULL when
-- neither is available.
CREATE OR REPLACE FUNCTION llm_gateway_usage_baseline(
    t uuid, h timestamptz, first_hour timestamptz,
    OUT kind text, OUT req_median double precision, OUT req_mad double precision,
    OUT cost_median double precision, OUT cost_mad double precision,
    OUT err_median double precision, OUT err_mad double precision)
LANGUAGE sql STABLE AS $$
    WITH lagged AS (
        SELECT k.kind, coalesce(p.requests, 0)::float8 AS requests,
               coalesce(p.cost_usd, 0)::float8 AS cost,
               p.errors::float8 / nullif(p.requests, 0) AS error_rate
        FROM (SELECT 'week' AS kind, w * interval '7 days' AS back
              FROM generate_series(1, 4) AS w
              UNION ALL
              SELECT 'day', d * interval '1 day' FROM generate_series(1, 6) AS d) AS k
        LEFT JOIN model_usage_tenant_hourly p ON p.tenant_id = t AND p.hour = h - k.back
        WHERE h - k.back >= first_hour
    ),
    chosen AS (
        SELECT CASE WHEN count(*) FILTER (WHERE kind = 'week') >= 2 THEN 'week'
                    WHEN count(*) FILTER (WHERE kind = 'day') >= 3 THEN 'day' END AS kind
        FROM lagged
    ),
    arrays AS (
        SELECT ch.kind, array_agg(l.requests) AS r, array_agg(l.cost) AS c,
               array_agg(l.error_rate) AS e
        FROM chosen ch JOIN lagged l ON l.kind = ch.kind
        GROUP BY ch.kind
    )
    SELECT a.kind, r.median, r.mad, c.median, c.mad, e.median, e.mad
    FROM (SELECT 1) AS one
    LEFT JOIN arrays a ON true
    CROSS JOIN LATERAL llm_gateway_median_mad(a.r) AS r
    CROSS JOIN LATERAL llm_gateway_median_mad(a.c) AS c
    CROSS JOIN LATERAL llm_gateway_median_mad(a.e) AS e
$$;

-- Baselines of the candidate hours in [lo, hi) that have none yet: hours with rows, and hours
-- that had rows a week earlier. Extends the covered range when it is contiguous with it.
CREATE OR REPLACE FUNCTION llm_gateway_compute_usage_baselines(lo timestamptz, hi timestamptz)
RETURNS bigint
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    n       bigint;
    cov_lo  timestamptz := llm_gateway_setting('usage_baselines_covered_from')::timestamptz;
    cov_hi  timestamptz := llm_gateway_setting('usage_baselines_covered_to')::timestamptz;
BEGIN
    IF lo >= hi THEN
        RETURN 0;
    END IF;
    INSERT INTO model_usage_tenant_baseline AS b
        (hour, tenant_id, kind, req_median, req_mad, cost_median, cost_mad, err_median, err_mad)
    SELECT c.hour, c.tenant_id, x.*
    FROM (SELECT DISTINCT u.tenant_id, u.hour
          FROM (SELECT s.tenant_id, s.hour FROM model_usage_tenant_hourly s
                WHERE s.hour >= lo AND s.hour < hi
                UNION ALL
                SELECT s.tenant_id, s.hour + interval '7 days' FROM model_usage_tenant_hourly s
                WHERE s.hour >= lo - interval '7 days' AND s.hour < hi - interval '7 days') u
          WHERE NOT EXISTS (SELECT 1 FROM model_usage_tenant_baseline e
                            WHERE e.hour = u.hour AND e.tenant_id = u.tenant_id)) AS c
    CROSS JOIN LATERAL llm_gateway_usage_baseline(
        c.tenant_id, c.hour,
        (SELECT min(f.hour) FROM model_usage_tenant_hourly f WHERE f.tenant_id = c.tenant_id)) x
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF cov_hi IS NULL OR lo > cov_hi OR hi < cov_lo THEN
        cov_lo := lo;
        cov_hi := hi;
    ELSE
        cov_lo := least(cov_lo, lo);
        cov_hi := greatest(cov_hi, hi);
    END IF;
    PERFORM llm_gateway_set_setting('usage_baselines_covered_from', cov_lo::text);
    PERFORM llm_gateway_set_setting('usage_baselines_covered_to', cov_hi::text);
    RETURN n;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Refresh
-- ---------------------------------------------------------------------------------------------

-- Applies the raw rows of [a, b) to the daily analytics rollups as the difference from what
-- model_usage_recent holds for those hours, and stores the new hours there (hours >= keep_from
-- only). One statement: every part sees the same snapshot.
CREATE OR REPLACE FUNCTION llm_gateway_apply_usage_analytics(a timestamptz, b timestamptz,
                                                             keep_from timestamptz)
RETURNS bigint
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    n bigint;
BEGIN
    WITH fresh AS MATERIALIZED (
        SELECT date_trunc('hour', "timestamp" AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
               tenant_id, coalesce(user_id, '') AS user_id, coalesce(endpoint, '') AS endpoint,
               provider, model_name, status, coalesce(tags, '{}') AS tags,
               CASE WHEN status = 'success'
                    THEN floor(ln(greatest(latency_ms, 1)) / ln(1.15))::smallint
                    ELSE -1::smallint END AS bucket,
               count(*)                                           AS requests,
               sum(input_tokens)                                  AS input_tokens,
               sum(output_tokens)                                 AS output_tokens,
               sum(total_tokens)                                  AS total_tokens,
               sum(estimated_cost_usd)                            AS cost_usd,
               count(*) FILTER (WHERE estimated_cost_usd IS NULL) AS unpriced_requests,
               sum(latency_ms)                                    AS latency_ms_sum,
               max(total_tokens)                                  AS max_total_tokens
        FROM model_usage_stats
        WHERE "timestamp" >= a AND "timestamp" < b
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
    ),
    old AS MATERIALIZED (
        SELECT * FROM model_usage_recent WHERE hour >= a AND hour < b
    ),
    diff AS MATERIALIZED (
        SELECT hour, tenant_id, user_id, endpoint, provider, model_name, status, tags, bucket,
               (hour AT TIME ZONE 'UTC')::date AS day,
               f.requests IS NULL AS gone,
               f.requests AS f_requests, f.input_tokens AS f_input_tokens,
               f.output_tokens AS f_output_tokens, f.total_tokens AS f_total_tokens,
               f.cost_usd AS f_cost_usd, f.unpriced_requests AS f_unpriced_requests,
               f.latency_ms_sum AS f_latency_ms_sum, f.max_total_tokens AS f_max_total_tokens,
               coalesce(f.requests, 0) - coalesce(o.requests, 0) AS d_requests,
               -- NULL when NULL on both sides, so sums of all-NULL columns stay NULL.
               CASE WHEN f.input_tokens IS NOT NULL OR o.input_tokens IS NOT NULL
                    THEN coalesce(f.input_tokens, 0) - coalesce(o.input_tokens, 0) END
                   AS d_input_tokens,
               CASE WHEN f.output_tokens IS NOT NULL OR o.output_tokens IS NOT NULL
                    THEN coalesce(f.output_tokens, 0) - coalesce(o.output_tokens, 0) END
                   AS d_output_tokens,
               CASE WHEN f.total_tokens IS NOT NULL OR o.total_tokens IS NOT NULL
                    THEN coalesce(f.total_tokens, 0) - coalesce(o.total_tokens, 0) END
                   AS d_total_tokens,
               CASE WHEN f.cost_usd IS NOT NULL OR o.cost_usd IS NOT NULL
                    THEN coalesce(f.cost_usd, 0) - coalesce(o.cost_usd, 0) END AS d_cost_usd,
               coalesce(f.unpriced_requests, 0) - coalesce(o.unpriced_requests, 0)
                   AS d_unpriced_requests,
               coalesce(f.latency_ms_sum, 0) - coalesce(o.latency_ms_sum, 0) AS d_latency_ms_sum
        FROM fresh f
        FULL JOIN old o USING (hour, tenant_id, user_id, endpoint, provider, model_name, status,
                               tags, bucket)
        WHERE (f.requests, f.input_tokens, f.output_tokens, f.cost_usd, f.unpriced_requests,
               f.latency_ms_sum, f.max_total_tokens)
              IS DISTINCT FROM
              (o.requests, o.input_tokens, o.output_tokens, o.cost_usd, o.unpriced_requests,
               o.latency_ms_sum, o.max_total_tokens)
    ),
    kept AS (
        INSERT INTO model_usage_recent AS r
        SELECT hour, tenant_id, user_id, endpoint, provider, model_name, status, tags, bucket,
               f_requests, f_input_tokens, f_output_tokens, f_total_tokens, f_cost_usd,
               f_unpriced_requests, f_latency_ms_sum, f_max_total_tokens
        FROM diff WHERE NOT gone AND hour >= keep_from
        ON CONFLICT (hour, tenant_id, user_id, endpoint, provider, model_name, status, tags,
                     bucket) DO UPDATE
        SET requests = EXCLUDED.requests, input_tokens = EXCLUDED.input_tokens,
            output_tokens = EXCLUDED.output_tokens, total_tokens = EXCLUDED.total_tokens,
            cost_usd = EXCLUDED.cost_usd, unpriced_requests = EXCLUDED.unpriced_requests,
            latency_ms_sum = EXCLUDED.latency_ms_sum, max_total_tokens = EXCLUDED.max_total_tokens
    ),
    dropped AS (
        DELETE FROM model_usage_recent r
        USING diff d
        WHERE d.gone AND r.hour = d.hour AND r.tenant_id = d.tenant_id
          AND r.user_id = d.user_id AND r.endpoint = d.endpoint AND r.provider = d.provider
          AND r.model_name = d.model_name AND r.status = d.status AND r.tags = d.tags
          AND r.bucket = d.bucket
    ),
    users AS (
        INSERT INTO model_usage_user_daily AS u
            (tenant_id, user_id, day, provider, model_name, status, requests, input_tokens,
             output_tokens, total_tokens, cost_usd, unpriced_requests, latency_ms_sum)
        SELECT tenant_id, user_id, day, provider, model_name, status, sum(d_requests),
               sum(d_input_tokens), sum(d_output_tokens), sum(d_total_tokens), sum(d_cost_usd),
               sum(d_unpriced_requests), sum(d_latency_ms_sum)
        FROM diff GROUP BY tenant_id, user_id, day, provider, model_name, status
        ON CONFLICT (tenant_id, user_id, day, provider, model_name, status) DO UPDATE
        SET requests = u.requests + EXCLUDED.requests,
            input_tokens = CASE WHEN u.input_tokens IS NOT NULL OR EXCLUDED.input_tokens IS NOT NULL
                THEN coalesce(u.input_tokens, 0) + coalesce(EXCLUDED.input_tokens, 0) END,
            output_tokens = CASE WHEN u.output_tokens IS NOT NULL
                                   OR EXCLUDED.output_tokens IS NOT NULL
                THEN coalesce(u.output_tokens, 0) + coalesce(EXCLUDED.output_tokens, 0) END,
            total_tokens = CASE WHEN u.total_tokens IS NOT NULL OR EXCLUDED.total_tokens IS NOT NULL
                THEN coalesce(u.total_tokens, 0) + coalesce(EXCLUDED.total_tokens, 0) END,
            cost_usd = CASE WHEN u.cost_usd IS NOT NULL OR EXCLUDED.cost_usd IS NOT NULL
                THEN coalesce(u.cost_usd, 0) + coalesce(EXCLUDED.cost_usd, 0) END,
            unpriced_requests = u.unpriced_requests + EXCLUDED.unpriced_requests,
            latency_ms_sum = u.latency_ms_sum + EXCLUDED.latency_ms_sum,
            refreshed_at = now()
    ),
    user_days AS (
        INSERT INTO model_usage_user_day AS u
            (tenant_id, day, user_id, requests, errors, input_tokens, output_tokens, cost_usd,
             unpriced_requests)
        SELECT tenant_id, day, user_id, sum(d_requests),
               coalesce(sum(d_requests) FILTER (WHERE status <> 'success'), 0),
               coalesce(sum(d_input_tokens), 0), coalesce(sum(d_output_tokens), 0),
               coalesce(sum(d_cost_usd), 0), sum(d_unpriced_requests)
        FROM diff GROUP BY tenant_id, day, user_id
        ON CONFLICT (tenant_id, day, user_id) DO UPDATE
        SET requests = u.requests + EXCLUDED.requests, errors = u.errors + EXCLUDED.errors,
            input_tokens = u.input_tokens + EXCLUDED.input_tokens,
            output_tokens = u.output_tokens + EXCLUDED.output_tokens,
            cost_usd = u.cost_usd + EXCLUDED.cost_usd,
            unpriced_requests = u.unpriced_requests + EXCLUDED.unpriced_requests
    ),
    endpoints AS (
        INSERT INTO model_usage_endpoint_daily AS e
            (tenant_id, day, endpoint, provider, model_name, requests, successes, input_tokens,
             output_tokens, ok_input_tokens, ok_output_tokens, cost_usd, unpriced_requests,
             max_total_tokens)
        SELECT tenant_id, day, endpoint, provider, model_name, sum(d_requests),
               coalesce(sum(d_requests) FILTER (WHERE status = 'success'), 0),
               coalesce(sum(d_input_tokens), 0), coalesce(sum(d_output_tokens), 0),
               coalesce(sum(d_input_tokens) FILTER (WHERE status = 'success'), 0),
               coalesce(sum(d_output_tokens) FILTER (WHERE status = 'success'), 0),
               coalesce(sum(d_cost_usd), 0), sum(d_unpriced_requests), max(f_max_total_tokens)
        FROM diff GROUP BY tenant_id, day, endpoint, provider, model_name
        ON CONFLICT (tenant_id, day, endpoint, provider, model_name) DO UPDATE
        SET requests = e.requests + EXCLUDED.requests,
            successes = e.successes + EXCLUDED.successes,
            input_tokens = e.input_tokens + EXCLUDED.input_tokens,
            output_tokens = e.output_tokens + EXCLUDED.output_tokens,
            ok_input_tokens = e.ok_input_tokens + EXCLUDED.ok_input_tokens,
            ok_output_tokens = e.ok_output_tokens + EXCLUDED.ok_output_tokens,
            cost_usd = e.cost_usd + EXCLUDED.cost_usd,
            unpriced_requests = e.unpriced_requests + EXCLUDED.unpriced_requests,
            max_total_tokens = greatest(e.max_total_tokens, EXCLUDED.max_total_tokens)
    ),
    latencies AS (
        INSERT INTO model_usage_latency_daily AS l
            (tenant_id, day, endpoint, provider, model_name, bucket, successes)
        SELECT tenant_id, day, endpoint, provider, model_name, bucket, sum(d_requests)
        FROM diff WHERE status = 'success'
        GROUP BY tenant_id, day, endpoint, provider, model_name, bucket
        ON CONFLICT (tenant_id, day, endpoint, provider, model_name, bucket) DO UPDATE
        SET successes = l.successes + EXCLUDED.successes
    ),
    tagged AS (
        INSERT INTO model_usage_tag_daily AS t
            (tenant_id, day, tag, requests, errors, input_tokens, output_tokens, cost_usd,
             unpriced_requests)
        SELECT d.tenant_id, d.day, tag, sum(d.d_requests),
               coalesce(sum(d.d_requests) FILTER (WHERE d.status <> 'success'), 0),
               coalesce(sum(d.d_input_tokens), 0), coalesce(sum(d.d_output_tokens), 0),
               coalesce(sum(d.d_cost_usd), 0), sum(d.d_unpriced_requests)
        FROM diff d CROSS JOIN LATERAL unnest(d.tags) AS tag
        GROUP BY d.tenant_id, d.day, tag
        ON CONFLICT (tenant_id, day, tag) DO UPDATE
        SET requests = t.requests + EXCLUDED.requests, errors = t.errors + EXCLUDED.errors,
            input_tokens = t.input_tokens + EXCLUDED.input_tokens,
            output_tokens = t.output_tokens + EXCLUDED.output_tokens,
            cost_usd = t.cost_usd + EXCLUDED.cost_usd,
            unpriced_requests = t.unpriced_requests + EXCLUDED.unpriced_requests
    )
    SELECT count(*) FROM diff
    INTO n;

    -- Groups a difference brought to zero (partial indexes: only those rows are visited).
    DELETE FROM model_usage_user_daily WHERE requests = 0;
    DELETE FROM model_usage_user_day WHERE requests = 0;
    DELETE FROM model_usage_endpoint_daily WHERE requests = 0;
    DELETE FROM model_usage_latency_daily WHERE successes = 0;
    DELETE FROM model_usage_tag_daily WHERE requests = 0;
    RETURN n;
END $$;

-- 008's entry point, now incremental: the tenant series for [from_ts, to_ts) (from
-- model_usage_hourly, which must be fresh), the daily analytics rollups by difference (or the
-- whole UTC days from raw rows when the range reaches before usage_analytics_staged_from), and
-- the anomaly baselines of its hours within the last 8 days. Returns the number of changed
-- fine-grained groups plus tenant-hours.
CREATE OR REPLACE FUNCTION llm_gateway_refresh_usage_analytics(from_ts timestamptz,
                                                               to_ts timestamptz)
RETURNS bigint
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    lo        timestamptz := date_trunc('hour', from_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    hi        timestamptz := date_trunc('hour', to_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    this_hour timestamptz := date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    staged    timestamptz := llm_gateway_setting('usage_analytics_staged_from')::timestamptz;
    horizon   timestamptz := (date_trunc('day', now() AT TIME ZONE 'UTC') - interval '1 day')
                             AT TIME ZONE 'UTC';
    day_lo    date;
    day_hi    date;
    d         date;
    n_hours   bigint;
    n_groups  bigint;
BEGIN
    IF hi < to_ts THEN
        hi := hi + interval '1 hour';
    END IF;
    IF lo >= hi THEN
        RETURN 0;
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

    -- The working set keeps yesterday and today: older hours leave it (their sums stay in the
    -- daily rollups, which are correct for them).
    IF staged IS NULL OR staged < horizon THEN
        DELETE FROM model_usage_recent WHERE hour < horizon;
        staged := horizon;
        PERFORM llm_gateway_set_setting('usage_analytics_staged_from', staged::text);
    END IF;

    IF lo < staged THEN
        -- Hours the working set does not hold: recompute their whole days from raw rows, one
        -- day per statement (a back-fill of months stays a series of small aggregates).
        -- Only the days with rows now (the hourly rollup was just refreshed from them) or
        -- before (the daily rollup): the range may be open-ended ('infinity').
        SELECT least((SELECT (min(h.hour) AT TIME ZONE 'UTC')::date FROM model_usage_hourly h
                      WHERE h.hour >= lo AND h.hour < hi),
                     (SELECT min(u.day) FROM model_usage_user_day u
                      WHERE u.day >= day_lo AND u.day < day_hi)),
               greatest((SELECT (max(h.hour) AT TIME ZONE 'UTC')::date FROM model_usage_hourly h
                         WHERE h.hour >= lo AND h.hour < hi),
                        (SELECT max(u.day) FROM model_usage_user_day u
                         WHERE u.day >= day_lo AND u.day < day_hi))
        INTO day_lo, day_hi;
        n_groups := 0;
        FOR d IN SELECT generate_series(day_lo, day_hi, interval '1 day')::date LOOP
            DELETE FROM model_usage_user_daily WHERE day = d;
            DELETE FROM model_usage_user_day WHERE day = d;
            DELETE FROM model_usage_endpoint_daily WHERE day = d;
            DELETE FROM model_usage_latency_daily WHERE day = d;
            DELETE FROM model_usage_tag_daily WHERE day = d;
            DELETE FROM model_usage_recent
            WHERE hour >= d::timestamp AT TIME ZONE 'UTC'
              AND hour < (d + 1)::timestamp AT TIME ZONE 'UTC';
            n_groups := n_groups + llm_gateway_apply_usage_analytics(
                d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC', staged);
        END LOOP;
    ELSE
        n_groups := llm_gateway_apply_usage_analytics(lo, hi, staged);
    END IF;

    -- Baselines older than 8 days are dropped (those hours are scored on the fly).
    DELETE FROM model_usage_tenant_baseline WHERE hour < this_hour - interval '8 days';
    IF llm_gateway_setting('usage_baselines_covered_from')::timestamptz
       < this_hour - interval '8 days' THEN
        PERFORM llm_gateway_set_setting('usage_baselines_covered_from',
                                        (this_hour - interval '8 days')::text);
    END IF;
    PERFORM llm_gateway_compute_usage_baselines(
        greatest(lo, this_hour - interval '8 days'), least(hi, this_hour + interval '1 hour'));
    RETURN n_hours + n_groups;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Anomalies: precomputed baselines where covered, computed on the fly elsewhere
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION llm_gateway_usage_anomalies(
    since        timestamptz,
    only_tenant  uuid DEFAULT NULL,
    min_score    double precision DEFAULT 4,
    min_requests double precision DEFAULT 5,
    as_of        timestamptz DEFAULT now()
) RETURNS TABLE (tenant_id uuid, hour timestamptz, metric text, observed double precision,
                 expected double precision, score double precision)
-- PL/pgSQL rather than SQL: its statement plan is cached per session (a SQL function's query
-- would be planned at every call, ~10 ms for this one).
LANGUAGE plpgsql STABLE SET jit = off AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
WITH bounds AS (
    SELECT date_trunc('hour', since AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS lo,
           date_trunc('hour', coalesce(as_of, now()) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hi,
           coalesce(llm_gateway_setting('usage_baselines_covered_from')::timestamptz,
                    'infinity') AS cov_lo,
           coalesce(llm_gateway_setting('usage_baselines_covered_to')::timestamptz,
                    'infinity') AS cov_hi
),
covered AS (
    SELECT greatest(b.lo, b.cov_lo) AS lo, least(b.hi, b.cov_hi) AS hi FROM bounds b
),
-- The hours outside the covered range: before it and after it (empty ranges are harmless).
uncovered AS (
    SELECT b.lo, least(b.hi, greatest(c.lo, b.lo)) AS hi FROM bounds b, covered c
    UNION ALL
    SELECT greatest(b.lo, c.hi, c.lo), b.hi FROM bounds b, covered c
),
-- LATERAL everywhere below: the plan is generic (the ranges are unknown when it is made), and
-- a parameterized index range scan per range is what must run, never a scan of a whole table.
pre AS (
    SELECT p.*
    FROM covered c
    CROSS JOIN LATERAL (
        SELECT p.tenant_id, p.hour, p.kind, p.req_median, p.req_mad, p.cost_median,
               p.cost_mad, p.err_median, p.err_mad
        FROM model_usage_tenant_baseline p
        WHERE only_tenant IS NULL AND p.hour >= c.lo AND p.hour < c.hi AND p.kind IS NOT NULL
        UNION ALL
        SELECT p.tenant_id, p.hour, p.kind, p.req_median, p.req_mad, p.cost_median,
               p.cost_mad, p.err_median, p.err_mad
        FROM model_usage_tenant_baseline p
        WHERE p.tenant_id = only_tenant AND p.hour >= c.lo AND p.hour < c.hi
          AND p.kind IS NOT NULL
    ) AS p
    WHERE c.lo < c.hi
),
-- Observed values of the covered hours: one range scan, hash-joined with their baselines.
pre_observed AS (
    SELECT o.*
    FROM covered c
    CROSS JOIN LATERAL (
        SELECT t.tenant_id, t.hour, t.requests, t.errors, t.cost_usd
        FROM model_usage_tenant_hourly t
        WHERE only_tenant IS NULL AND t.hour >= c.lo AND t.hour < c.hi
        UNION ALL
        SELECT t.tenant_id, t.hour, t.requests, t.errors, t.cost_usd
        FROM model_usage_tenant_hourly t
        WHERE t.tenant_id = only_tenant AND t.hour >= c.lo AND t.hour < c.hi
    ) AS o
    WHERE c.lo < c.hi
),
series AS (
    SELECT s.tenant_id, s.hour, u.lo, u.hi
    FROM uncovered u
    CROSS JOIN LATERAL (
        SELECT t.tenant_id, t.hour FROM model_usage_tenant_hourly t
        WHERE only_tenant IS NULL AND t.hour >= u.lo - interval '7 days' AND t.hour < u.hi
        UNION ALL
        SELECT t.tenant_id, t.hour FROM model_usage_tenant_hourly t
        WHERE t.tenant_id = only_tenant AND t.hour >= u.lo - interval '7 days'
          AND t.hour < u.hi
    ) AS s
    WHERE u.lo < u.hi
),
candidates AS (
    SELECT DISTINCT c.tenant_id, c.hour
    FROM (SELECT s.tenant_id, s.hour FROM series s WHERE s.hour >= s.lo
          UNION ALL
          SELECT s.tenant_id, s.hour + interval '7 days' FROM series s
          WHERE s.hour < s.hi - interval '7 days') AS c
),
computed AS (
    SELECT c.tenant_id, c.hour, x.kind, x.req_median, x.req_mad, x.cost_median, x.cost_mad,
           x.err_median, x.err_mad,
           coalesce(o.requests, 0)::float8 AS obs_requests,
           coalesce(o.errors, 0)::float8 AS obs_errors,
           coalesce(o.cost_usd, 0)::float8 AS obs_cost
    FROM candidates c
    CROSS JOIN LATERAL llm_gateway_usage_baseline(
        c.tenant_id, c.hour,
        (SELECT min(f.hour) FROM model_usage_tenant_hourly f WHERE f.tenant_id = c.tenant_id)) x
    LEFT JOIN model_usage_tenant_hourly o ON o.tenant_id = c.tenant_id AND o.hour = c.hour
    WHERE x.kind IS NOT NULL
),
samples AS (
    SELECT p.*, coalesce(o.requests, 0)::float8 AS obs_requests,
           coalesce(o.errors, 0)::float8 AS obs_errors,
           coalesce(o.cost_usd, 0)::float8 AS obs_cost
    FROM pre p
    LEFT JOIN pre_observed o ON o.tenant_id = p.tenant_id AND o.hour = p.hour
    UNION ALL
    SELECT * FROM computed
),
scored AS (
    SELECT sa.tenant_id, sa.hour, 'requests' AS metric, sa.obs_requests AS observed,
           sa.req_median AS expected,
           abs(sa.obs_requests - sa.req_median)
               / greatest(1.4826 * sa.req_mad, 0.15 * sa.req_median, sqrt(sa.req_median), 1)
               AS score,
           greatest(sa.obs_requests, sa.req_median) >= min_requests AS eligible
    FROM samples sa
    UNION ALL
    SELECT sa.tenant_id, sa.hour, 'cost', sa.obs_cost, sa.cost_median,
           abs(sa.obs_cost - sa.cost_median)
               / greatest(1.4826 * sa.cost_mad, 0.15 * sa.cost_median, 0.01),
           greatest(sa.obs_requests, sa.req_median) >= min_requests
    FROM samples sa
    UNION ALL
    SELECT sa.tenant_id, sa.hour, 'error_rate', sa.obs_errors / sa.obs_requests, sa.err_median,
           (sa.obs_errors / sa.obs_requests - sa.err_median)
               / greatest(1.4826 * sa.err_mad, 0.02,
                          sqrt(greatest(sa.err_median, 0.01) * (1 - least(sa.err_median, 0.99))
                               / sa.obs_requests)),
           sa.obs_requests >= 10 AND sa.err_median IS NOT NULL
               AND sa.obs_errors - sa.err_median * sa.obs_requests >= 5
    FROM samples sa
    WHERE sa.obs_requests > 0
)
SELECT s.tenant_id, s.hour, s.metric, s.observed, s.expected, s.score
FROM scored s
WHERE s.eligible AND s.score >= min_score
ORDER BY s.hour, s.tenant_id, s.metric;
END
$$;
COMMENT ON FUNCTION llm_gateway_usage_anomalies(timestamptz, uuid, double precision,
                                                double precision, timestamptz) IS
    'Hourly cost, requests and error-rate anomalies per tenant against its hour-of-week '
    'baseline (median/MAD of the last 4 weeks, precomputed by maintenance for the last 8 days); '
    'the current hour is not scored.';

-- One NOTIFY llm_gateway_events per anomaly of the last `lookback` not announced before, by
-- any process: the unique key of model_usage_anomalies_seen decides which insert announces it.
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
            'type', 'usage_anomaly', 'tenant_id', a.tenant_id, 'hour', a.hour,
            'metric', a.metric, 'observed', a.observed, 'expected', a.expected,
            'score', round(a.score::numeric, 2))::text);
        n := n + 1;
    END LOOP;
    DELETE FROM model_usage_anomalies_seen WHERE hour < now() - interval '35 days';
    RETURN n;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Maintenance: 002's entry point, plus the anomaly announcements
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION llm_gateway_maintain_usage(
    OUT skipped            boolean,
    OUT partitions_created integer,
    OUT rows_moved         bigint,
    OUT partitions_dropped integer,
    OUT rollup_from        timestamptz,
    OUT rollup_to          timestamptz,
    OUT rollup_rows        bigint,
    OUT analyzed           boolean
)
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    this_hour   timestamptz := date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    lookback    interval := make_interval(
                    hours => llm_gateway_setting('usage_rollup_lookback_hours')::integer);
    max_hours   interval := make_interval(
                    hours => llm_gateway_setting('usage_rollup_max_hours_per_run')::integer);
    watermark   timestamptz := llm_gateway_setting('usage_rollup_refreshed_to')::timestamptz;
    analyzed_at timestamptz := llm_gateway_setting('usage_stats_analyzed_at')::timestamptz;
BEGIN
    skipped := NOT pg_try_advisory_xact_lock(hashtext('llm_gateway_maintain_usage'));
    IF skipped THEN
        RETURN;
    END IF;
    IF max_hours <= lookback THEN
        RAISE EXCEPTION 'usage_rollup_max_hours_per_run must exceed usage_rollup_lookback_hours';
    END IF;

    BEGIN
        SELECT count(*), coalesce(sum(e.rows_moved), 0) INTO partitions_created, rows_moved
        FROM llm_gateway_ensure_usage_partitions(3) e;
    EXCEPTION WHEN lock_not_available THEN
        RAISE WARNING 'llm_gateway_maintain_usage: partitions not ensured: %', SQLERRM;
    END;

    BEGIN
        SELECT count(*) INTO partitions_dropped FROM llm_gateway_apply_usage_retention();
    EXCEPTION WHEN lock_not_available THEN
        RAISE WARNING 'llm_gateway_maintain_usage: retention not applied: %', SQLERRM;
    END;

    IF watermark IS NULL THEN
        SELECT date_trunc('hour', min("timestamp") AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
        INTO rollup_from FROM model_usage_stats;
        rollup_from := least(rollup_from, this_hour - lookback);
    ELSE
        rollup_from := least(watermark, this_hour) - lookback;
    END IF;
    rollup_from := greatest(rollup_from, llm_gateway_usage_retention_cutoff());
    rollup_to := least(this_hour + interval '1 hour', rollup_from + max_hours);
    rollup_rows := llm_gateway_refresh_usage_hourly(rollup_from, rollup_to);
    PERFORM llm_gateway_set_setting('usage_rollup_refreshed_to', rollup_to::text);

    analyzed := analyzed_at IS NULL OR analyzed_at < now() - interval '1 day';
    IF analyzed THEN
        ANALYZE model_usage_stats;
        PERFORM llm_gateway_set_setting('usage_stats_analyzed_at', now()::text);
    END IF;

    -- Anomalies are an extra: a failure here must not undo the upkeep above.
    IF coalesce(llm_gateway_setting('usage_anomaly_notify'), 'on') = 'on' THEN
        BEGIN
            PERFORM llm_gateway_notify_usage_anomalies();
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'llm_gateway_maintain_usage: anomalies not announced: %', SQLERRM;
        END;
    END IF;
END $$;

COMMENT ON FUNCTION llm_gateway_maintain_usage() IS
    'Usage upkeep: monthly partitions ahead, retention, rollup refresh, daily ANALYZE, '
    'announcement of new usage anomalies. Run every few minutes (the SDK does; or pg_cron).';

-- Rows written before this migration are not rolled up here: at 10 M rows that took over 40
-- minutes, in one transaction. Migration 012's llm_gateway_backfill_usage_analytics() does it
-- in batches of whole days (maintenance, a day per run, or `llm-gateway db backfill`); this
-- marks the days to do: every day with rows up to today.
INSERT INTO llm_gateway_settings (key, value, description) VALUES
    ('usage_analytics_backfill_before',
     (SELECT ((now() AT TIME ZONE 'UTC')::date + 1)::text
      WHERE EXISTS (SELECT FROM model_usage_hourly)),
     'State: the daily analytics rollups (009) lack the days before this UTC date that have '
     'rows; llm_gateway_backfill_usage_analytics() fills them, newest first. NULL = complete.')
ON CONFLICT (key) DO NOTHING;
