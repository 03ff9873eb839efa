-- 002: monthly partitions of model_usage_stats, retention, the rollups (model_usage_hourly per
-- tenant, model_usage_daily_totals for all tenants) and the maintenance entry point.
-- Idempotent: every object is created with IF NOT EXISTS / OR REPLACE.
--
-- Retention is off (keep everything) until set, e.g. to keep 13 whole months plus the current:
--     SELECT llm_gateway_set_setting('usage_retention_months', '13');
-- The settings and what they mean: SELECT * FROM llm_gateway_settings;
--
-- How it is run
--   * The SDK's usage writer calls `SELECT * FROM llm_gateway_maintain_usage()` at start and
--     every few minutes when the function exists. Calls from several processes are safe: one
--     runs, the others return at once (advisory lock).
--   * Or an operator schedules it, e.g. with pg_cron:
--       SELECT cron.schedule('llm-gateway-usage', '*/5 * * * *',
--                            'SELECT llm_gateway_maintain_usage()');
--     or from cron: psql "$DATABASE_URL" -c 'SELECT * FROM llm_gateway_maintain_usage()'
--
-- All months, hours and days here are UTC, whatever the session TimeZone.

-- ---------------------------------------------------------------------------------------------
-- Settings: one row per key; value NULL means "not set". Edit with llm_gateway_set_setting().
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS llm_gateway_settings (
    key         text PRIMARY KEY,
    value       text,
    description text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO llm_gateway_settings (key, value, description) VALUES
    ('usage_retention_months', NULL,
     'Raw usage rows: keep the current UTC month plus this many whole months before it; older '
     'monthly partitions are dropped by llm_gateway_maintain_usage(). NULL = keep forever.'),
    ('usage_rollup_retention_months', NULL,
     'model_usage_hourly and model_usage_daily_totals: same rule for the rollups (they may be '
     'kept longer than the raw rows). NULL = keep forever.'),
    ('usage_rollup_lookback_hours', '3',
     'Each maintenance run recomputes this many hours before the current one, to catch rows '
     'that arrive late.'),
    ('usage_rollup_max_hours_per_run', '168',
     'Upper bound on the hours one maintenance run recomputes, so catching up after downtime '
     '(or the first back-fill) is spread over several runs.'),
    ('usage_rollup_refreshed_to', NULL,
     'State, written by llm_gateway_maintain_usage(): the rollup is computed up to this '
     'instant. NULL = never run; the next run starts from the oldest raw row.'),
    ('usage_stats_analyzed_at', NULL,
     'State: last ANALYZE of the partitioned parent (autovacuum never analyzes it, and the '
     'planner needs its statistics for queries over several partitions).')
ON CONFLICT (key) DO NOTHING;
COMMENT ON TABLE llm_gateway_settings IS
    'llm-gateway database-side settings; see the description column of each key.';

CREATE OR REPLACE FUNCTION llm_gateway_setting(setting_key text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT value FROM llm_gateway_settings WHERE key = setting_key
$$;

CREATE OR REPLACE FUNCTION llm_gateway_set_setting(setting_key text, new_value text) RETURNS void
LANGUAGE sql AS $$
    UPDATE llm_gateway_settings SET value = new_value, updated_at = now() WHERE key = setting_key
$$;

-- ---------------------------------------------------------------------------------------------
-- Partitions
-- ---------------------------------------------------------------------------------------------

-- The partitions of model_usage_stats with their bounds (NULL = MINVALUE / MAXVALUE).
CREATE OR REPLACE FUNCTION llm_gateway_usage_partitions()
RETURNS TABLE (partition regclass, range_from timestamptz, range_to timestamptz,
               is_default boolean)
LANGUAGE sql STABLE AS $$
    SELECT c.oid::regclass,
           (regexp_match(b.bound, $re$FROM \('([^']*)'\)$re$))[1]::timestamptz,
           (regexp_match(b.bound, $re$TO \('([^']*)'\)$re$))[1]::timestamptz,
           b.bound = 'DEFAULT'
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) b
    WHERE i.inhparent = 'model_usage_stats'::regclass
$$;

-- Creates the monthly partitions model_usage_stats_pYYYY_MM for the months from
-- (current - months_back) to (current + months_ahead), plus every month that has rows sitting in
-- the DEFAULT partition (rows written before this migration, back-fills, clock skew).
--
-- PostgreSQL refuses a new partition while the default partition holds rows of its range, so
-- those rows are moved in the same transaction: the default partition is locked (inserts that
-- would land there wait), its rows of the month are moved into a fresh table, and that table is
-- attached. ATTACH builds the parent's indexes on it. Nothing is lost: it all commits or not.
-- A month already covered by any partition (whatever its name) is left alone.
-- Lock waits are bounded by lock_timeout (5s unless the caller set one).
CREATE OR REPLACE FUNCTION llm_gateway_ensure_usage_partitions(
    months_ahead integer DEFAULT 3,
    months_back  integer DEFAULT 1
) RETURNS TABLE (partition_name text, range_from timestamptz, range_to timestamptz,
                 rows_moved bigint)
LANGUAGE plpgsql AS $$
DECLARE
    parent       regclass := 'model_usage_stats'::regclass;
    dflt         regclass;
    this_month   timestamp := date_trunc('month', now() AT TIME ZONE 'UTC');
    months       timestamp[];
    in_default   timestamp[];
    m            timestamp;
    lo           timestamptz;
    hi           timestamptz;
    cols         text;
    saved_lock_timeout text := current_setting('lock_timeout');
BEGIN
    SELECT NULLIF(partdefid, 0)::regclass INTO dflt
    FROM pg_partitioned_table WHERE partrelid = parent;
    -- Every stored column; the generated total_tokens is recomputed on insert.
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO cols
    FROM pg_attribute
    WHERE attrelid = parent AND attnum > 0 AND NOT attisdropped AND attgenerated = '';

    months := ARRAY(SELECT generate_series(this_month - make_interval(months => months_back),
                                           this_month + make_interval(months => months_ahead),
                                           interval '1 month'));
    IF dflt IS NOT NULL THEN
        EXECUTE format('SELECT array_agg(DISTINCT date_trunc(''month'', "timestamp" AT TIME ZONE '
                       '''UTC'')) FROM %s', dflt)
            INTO in_default;
        months := months || coalesce(in_default, '{}');
    END IF;

    IF saved_lock_timeout = '0' THEN
        PERFORM set_config('lock_timeout', '5s', true);
    END IF;

    FOR m IN SELECT DISTINCT x FROM unnest(months) AS x ORDER BY 1 LOOP
        lo := m AT TIME ZONE 'UTC';
        hi := (m + interval '1 month') AT TIME ZONE 'UTC';
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM llm_gateway_usage_partitions() p
            WHERE NOT p.is_default
              AND (p.range_from IS NULL OR p.range_from < hi)
              AND (p.range_to IS NULL OR p.range_to > lo));

        partition_name := format('model_usage_stats_p%s', to_char(m, 'YYYY_MM'));
        rows_moved := 0;
        EXECUTE format('CREATE TABLE %I (LIKE %s INCLUDING DEFAULTS INCLUDING GENERATED)',
                       partition_name, parent);
        IF dflt IS NOT NULL THEN
            EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', dflt);
            EXECUTE format('WITH moved AS (DELETE FROM %s WHERE "timestamp" >= $1 AND "timestamp" < $2'
                           ' RETURNING %s) INSERT INTO %I (%s) SELECT %s FROM moved',
                           dflt, cols, partition_name, cols, cols)
                USING lo, hi;
            GET DIAGNOSTICS rows_moved = ROW_COUNT;
        END IF;
        EXECUTE format('ALTER TABLE %s ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       parent, partition_name, lo, hi);
        range_from := lo;
        range_to := hi;
        RETURN NEXT;
    END LOOP;

    PERFORM set_config('lock_timeout', saved_lock_timeout, true);
END $$;

-- Start of the oldest month usage_retention_months keeps; NULL when it keeps everything.
CREATE OR REPLACE FUNCTION llm_gateway_usage_retention_cutoff() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT (date_trunc('month', now() AT TIME ZONE 'UTC')
            - make_interval(months => llm_gateway_setting('usage_retention_months')::integer))
           AT TIME ZONE 'UTC'
$$;

-- Drops whole monthly partitions older than the usage_retention_months setting (and deletes
-- rollup rows, hourly and daily, older than usage_rollup_retention_months). Returns the
-- dropped partitions.
-- Never drops the default partition, an unbounded one, or one with a row at/after the cutoff.
CREATE OR REPLACE FUNCTION llm_gateway_apply_usage_retention() RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    keep_months   integer := llm_gateway_setting('usage_retention_months')::integer;
    rollup_months integer := llm_gateway_setting('usage_rollup_retention_months')::integer;
    this_month    timestamp := date_trunc('month', now() AT TIME ZONE 'UTC');
    cutoff        timestamptz;
    has_newer     boolean;
    dropped       text;
    saved_lock_timeout text := current_setting('lock_timeout');
    p             record;
BEGIN
    IF keep_months < 0 OR rollup_months < 0 THEN
        RAISE EXCEPTION 'retention months must be >= 0 (NULL keeps everything)';
    END IF;

    IF rollup_months IS NOT NULL THEN
        DELETE FROM model_usage_hourly
        WHERE hour < (this_month - make_interval(months => rollup_months)) AT TIME ZONE 'UTC';
        DELETE FROM model_usage_daily_totals
        WHERE day < (this_month - make_interval(months => rollup_months))::date;
    END IF;
    IF keep_months IS NULL THEN
        RETURN;
    END IF;

    cutoff := llm_gateway_usage_retention_cutoff();
    IF saved_lock_timeout = '0' THEN
        PERFORM set_config('lock_timeout', '5s', true);
    END IF;
    FOR p IN
        SELECT * FROM llm_gateway_usage_partitions()
        WHERE NOT is_default AND range_to <= cutoff
        ORDER BY range_from
    LOOP
        -- The bounds already guarantee it; checked anyway because a drop cannot be undone.
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE "timestamp" >= $1)', p.partition)
            INTO has_newer USING cutoff;
        IF has_newer THEN
            RAISE WARNING 'retention: % holds rows at or after %, not dropped', p.partition, cutoff;
            CONTINUE;
        END IF;
        dropped := p.partition::text;  -- the name, while the table still exists
        EXECUTE format('DROP TABLE %s', p.partition);
        RETURN NEXT dropped;
    END LOOP;
    PERFORM set_config('lock_timeout', saved_lock_timeout, true);
END $$;

-- ---------------------------------------------------------------------------------------------
-- Hourly rollup
-- ---------------------------------------------------------------------------------------------

-- One row per tenant, UTC hour, provider, model and status. Sums are NULL when every raw value
-- was NULL, like SUM() over the raw table, so both give the same numbers. The rate-limited
-- count is the row with status = 'rate_limit'; avg latency = latency_ms_sum / requests.
CREATE TABLE IF NOT EXISTS model_usage_hourly (
    tenant_id         uuid        NOT NULL,
    hour              timestamptz NOT NULL,
    provider          text        NOT NULL,
    model_name        text        NOT NULL,
    status            text        NOT NULL,
    requests          bigint      NOT NULL,
    input_tokens      bigint,
    output_tokens     bigint,
    total_tokens      bigint,
    cost_usd          numeric,
    unpriced_requests bigint      NOT NULL,  -- rows with a NULL estimated_cost_usd
    latency_ms_sum    bigint      NOT NULL,
    latency_ms_max    integer     NOT NULL,
    refreshed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, hour, provider, model_name, status)
);
COMMENT ON TABLE model_usage_hourly IS
    'Hourly (UTC) rollup of model_usage_stats per tenant, provider, model and status; '
    'recomputed by llm_gateway_maintain_usage().';
-- Refreshes find their hours through it.
CREATE INDEX IF NOT EXISTS model_usage_hourly_hour ON model_usage_hourly (hour);

-- All tenants together, one row per UTC day, provider, model and status, for the all-tenant
-- daily reports. Hours of small tenants hardly compress (a tenant with a few requests an hour
-- has about one rollup row per request), so summing model_usage_hourly over 30 days for every
-- tenant reads millions of rows; this table holds a few thousand.
CREATE TABLE IF NOT EXISTS model_usage_daily_totals (
    day               date        NOT NULL,
    provider          text        NOT NULL,
    model_name        text        NOT NULL,
    status            text        NOT NULL,
    requests          bigint      NOT NULL,
    input_tokens      bigint,
    output_tokens     bigint,
    total_tokens      bigint,
    cost_usd          numeric,
    unpriced_requests bigint      NOT NULL,
    latency_ms_sum    bigint      NOT NULL,
    latency_ms_max    integer     NOT NULL,
    refreshed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, provider, model_name, status)
);
COMMENT ON TABLE model_usage_daily_totals IS
    'Daily (UTC) totals of model_usage_hourly over all tenants, per provider, model and status.';

-- Recomputes model_usage_hourly for the UTC hours overlapping [from_ts, to_ts) from the raw
-- table, then model_usage_daily_totals for the UTC days those hours fall in (from the hourly
-- table). Groups are upserted, rows whose numbers did not change are left alone, and groups
-- with no rows left are deleted. Recomputing, never incrementing, makes a second run harmless
-- and lets a re-run pick up late rows. Returns the number of rollup rows written or deleted.
-- Hours whose raw partition retention dropped would come back empty: do not refresh them.
-- JIT off: the plan's cost crosses jit_above_cost, and compiling costs more than it saves.
CREATE OR REPLACE FUNCTION llm_gateway_refresh_usage_hourly(from_ts timestamptz,
                                                            to_ts timestamptz)
RETURNS bigint
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    lo      timestamptz := date_trunc('hour', from_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    hi      timestamptz := date_trunc('hour', to_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    day_lo  date;
    day_hi  date;
    hourly  bigint;
    daily   bigint;
BEGIN
    IF hi < to_ts THEN
        hi := hi + interval '1 hour';
    END IF;
    day_lo := (lo AT TIME ZONE 'UTC')::date;
    day_hi := ((hi - interval '1 microsecond') AT TIME ZONE 'UTC')::date + 1;
    -- Two refreshes of one hour must not interleave (an older snapshot could win).
    PERFORM pg_advisory_xact_lock(hashtext('llm_gateway_refresh_usage_hourly'));

    WITH fresh AS MATERIALIZED (
        SELECT tenant_id,
               date_trunc('hour', "timestamp" AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
               provider, model_name, status,
               count(*)                                           AS requests,
               sum(input_tokens)                                  AS input_tokens,
               sum(output_tokens)                                 AS output_tokens,
               sum(total_tokens)                                  AS total_tokens,
               sum(estimated_cost_usd)                            AS cost_usd,
               count(*) FILTER (WHERE estimated_cost_usd IS NULL) AS unpriced_requests,
               sum(latency_ms)                                    AS latency_ms_sum,
               max(latency_ms)                                    AS latency_ms_max
        FROM model_usage_stats
        WHERE "timestamp" >= lo AND "timestamp" < hi
        GROUP BY 1, 2, 3, 4, 5
    ),
    upserted AS (
        INSERT INTO model_usage_hourly AS h
            (tenant_id, hour, provider, model_name, status, requests, input_tokens,
             output_tokens, total_tokens, cost_usd, unpriced_requests, latency_ms_sum,
             latency_ms_max)
        SELECT * FROM fresh
        ON CONFLICT (tenant_id, hour, provider, model_name, status) DO UPDATE
        SET requests = EXCLUDED.requests,
            input_tokens = EXCLUDED.input_tokens,
            output_tokens = EXCLUDED.output_tokens,
            total_tokens = EXCLUDED.total_tokens,
            cost_usd = EXCLUDED.cost_usd,
            unpriced_requests = EXCLUDED.unpriced_requests,
            latency_ms_sum = EXCLUDED.latency_ms_sum,
            latency_ms_max = EXCLUDED.latency_ms_max,
            refreshed_at = now()
        WHERE (h.requests, h.input_tokens, h.output_tokens, h.total_tokens, h.cost_usd,
               h.unpriced_requests, h.latency_ms_sum, h.latency_ms_max)
              IS DISTINCT FROM
              (EXCLUDED.requests, EXCLUDED.input_tokens, EXCLUDED.output_tokens,
               EXCLUDED.total_tokens, EXCLUDED.cost_usd, EXCLUDED.unpriced_requests,
               EXCLUDED.latency_ms_sum, EXCLUDED.latency_ms_max)
        RETURNING 1
    ),
    vanished AS (
        DELETE FROM model_usage_hourly h
        WHERE h.hour >= lo AND h.hour < hi
          AND NOT EXISTS (SELECT 1 FROM fresh f
                          WHERE f.tenant_id = h.tenant_id AND f.hour = h.hour
                            AND f.provider = h.provider AND f.model_name = h.model_name
                            AND f.status = h.status)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upserted) + (SELECT count(*) FROM vanished) INTO hourly;

    -- A separate statement, so it sees the hours just written.
    WITH fresh AS MATERIALIZED (
        SELECT (hour AT TIME ZONE 'UTC')::date AS day, provider, model_name, status,
               sum(requests)          AS requests,
               sum(input_tokens)      AS input_tokens,
               sum(output_tokens)     AS output_tokens,
               sum(total_tokens)      AS total_tokens,
               sum(cost_usd)          AS cost_usd,
               sum(unpriced_requests) AS unpriced_requests,
               sum(latency_ms_sum)    AS latency_ms_sum,
               max(latency_ms_max)    AS latency_ms_max
        FROM model_usage_hourly
        WHERE hour >= day_lo::timestamp AT TIME ZONE 'UTC'
          AND hour < day_hi::timestamp AT TIME ZONE 'UTC'
        GROUP BY 1, 2, 3, 4
    ),
    upserted AS (
        INSERT INTO model_usage_daily_totals AS d
            (day, provider, model_name, status, requests, input_tokens, output_tokens,
             total_tokens, cost_usd, unpriced_requests, latency_ms_sum, latency_ms_max)
        SELECT * FROM fresh
        ON CONFLICT (day, provider, model_name, status) DO UPDATE
        SET requests = EXCLUDED.requests,
            input_tokens = EXCLUDED.input_tokens,
            output_tokens = EXCLUDED.output_tokens,
            total_tokens = EXCLUDED.total_tokens,
            cost_usd = EXCLUDED.cost_usd,
            unpriced_requests = EXCLUDED.unpriced_requests,
            latency_ms_sum = EXCLUDED.latency_ms_sum,
            latency_ms_max = EXCLUDED.latency_ms_max,
            refreshed_at = now()
        WHERE (d.requests, d.input_tokens, d.output_tokens, d.total_tokens, d.cost_usd,
               d.unpriced_requests, d.latency_ms_sum, d.latency_ms_max)
              IS DISTINCT FROM
              (EXCLUDED.requests, EXCLUDED.input_tokens, EXCLUDED.output_tokens,
               EXCLUDED.total_tokens, EXCLUDED.cost_usd, EXCLUDED.unpriced_requests,
               EXCLUDED.latency_ms_sum, EXCLUDED.latency_ms_max)
        RETURNING 1
    ),
    vanished AS (
        DELETE FROM model_usage_daily_totals d
        WHERE d.day >= day_lo AND d.day < day_hi
          AND NOT EXISTS (SELECT 1 FROM fresh f
                          WHERE f.day = d.day AND f.provider = d.provider
                            AND f.model_name = d.model_name AND f.status = d.status)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upserted) + (SELECT count(*) FROM vanished) INTO daily;

    RETURN hourly + daily;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Planner statistics
-- ---------------------------------------------------------------------------------------------

-- Without these the planner takes the number of days in a GROUP BY day to be the number of
-- distinct timestamps (millions), and plans a spilling, non-parallel aggregate. PostgreSQL 15
-- accepts expression statistics on the partitioned parent and uses them for queries on it,
-- but only ANALYZE of the parent builds them, which autovacuum never does: hence the daily
-- ANALYZE in llm_gateway_maintain_usage(). The expression must match the query's exactly:
-- the first is the UTC day used by sql/monitoring, the second the session-zone day that ad-hoc
-- queries tend to use.
CREATE STATISTICS IF NOT EXISTS model_usage_stats_day_utc
    ON (("timestamp" AT TIME ZONE 'UTC')::date) FROM model_usage_stats;
CREATE STATISTICS IF NOT EXISTS model_usage_stats_day_local
    ON (date_trunc('day', "timestamp")) FROM model_usage_stats;
CREATE STATISTICS IF NOT EXISTS model_usage_hourly_day_utc
    ON ((hour AT TIME ZONE 'UTC')::date) FROM model_usage_hourly;

-- ---------------------------------------------------------------------------------------------
-- Entry point
-- ---------------------------------------------------------------------------------------------

-- Ensures partitions 3 months ahead, applies retention, recomputes the rollup from
-- (refreshed_to - lookback) up to the end of the current hour (at most
-- usage_rollup_max_hours_per_run hours; the first run starts at the oldest raw row), and
-- ANALYZEs the parent once a day. Returns one row; skipped = true when another session was
-- running it. A step that cannot get its lock within lock_timeout is skipped with a WARNING
-- (its columns are NULL) and retried on the next run; any other error is raised.
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
    -- Never recompute hours whose raw rows retention has dropped: that would empty them.
    rollup_from := greatest(rollup_from, llm_gateway_usage_retention_cutoff());
    rollup_to := least(this_hour + interval '1 hour', rollup_from + max_hours);
    rollup_rows := llm_gateway_refresh_usage_hourly(rollup_from, rollup_to);
    PERFORM llm_gateway_set_setting('usage_rollup_refreshed_to', rollup_to::text);

    analyzed := analyzed_at IS NULL OR analyzed_at < now() - interval '1 day';
    IF analyzed THEN
        ANALYZE model_usage_stats;
        PERFORM llm_gateway_set_setting('usage_stats_analyzed_at', now()::text);
    END IF;
END $$;

COMMENT ON FUNCTION llm_gateway_maintain_usage() IS
    'Usage upkeep: monthly partitions ahead, retention, rollup refresh, daily ANALYZE. '
    'Run every few minutes (the SDK does; or pg_cron).';

-- Partitions for the previous, current and next three months now, so the default partition
-- stays nearly empty. On a database where 001 has been collecting rows, this moves them out of
-- the default partition inside this migration (a few minutes for tens of millions of rows).
-- If a lock cannot be had in time the migration still succeeds and maintenance does it later.
DO $$
BEGIN
    PERFORM llm_gateway_ensure_usage_partitions();
EXCEPTION WHEN lock_not_available THEN
    RAISE WARNING '002: partitions not created now (%); llm_gateway_maintain_usage() will', SQLERRM;
END $$;
