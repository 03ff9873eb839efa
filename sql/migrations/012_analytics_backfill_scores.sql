-- 012: analytics at 10 M rows. Idempotent. UTC.
--
-- * Stored anomaly scores. Scoring every tenant's hours at query time read a baseline row and
--   an observed row per active tenant-hour (~24 k for 24 hours at 10 M rows). Now each
--   complete hour is scored once, when maintenance refreshes it (and again while it is within
--   the refresh lookback, for late rows), and the scores from usage_anomaly_scores_min_score
--   up are kept in model_usage_anomaly_scores for usage_anomaly_scores_days. The detector reads
--   that table for the hours it covers and computes the others as before (009's function,
--   renamed llm_gateway_usage_anomalies_computed), so every answer is the same either way.
-- * Batched back-fill. 009 no longer back-fills its daily rollups inside the migration;
--   llm_gateway_backfill_usage_analytics(days) does a few whole days per call (one transaction
--   each when called on its own), newest first, then the anomaly scores of older hours.
--   Maintenance calls it once per run (usage_analytics_backfill_days_per_run days);
--   `llm-gateway db backfill` runs it to the end; llm_gateway_usage_analytics_backfill_state()
--   says what is left (`llm-gateway db status`).

INSERT INTO llm_gateway_settings (key, value, description) VALUES
    -- 009 (since it stopped back-filling) sets this one; a database that applied the earlier
    -- 009, which back-filled in the migration, gets NULL: nothing to do.
    ('usage_analytics_backfill_before', NULL,
     'State: the daily analytics rollups (009) lack the days before this UTC date that have '
     'rows; llm_gateway_backfill_usage_analytics() fills them, newest first. NULL = complete.'),
    ('usage_analytics_backfill_days_per_run', '1',
     'Whole days (or days of anomaly scores) llm_gateway_maintain_usage() back-fills per run '
     'while a back-fill is pending; 0 leaves it to `llm-gateway db backfill`.'),
    ('usage_anomaly_scores_min_score', '2',
     'Anomaly scores from this score up are stored by maintenance; a query asking for a lower '
     'min_score (or another min_requests than 5) computes its hours on the fly.'),
    ('usage_anomaly_scores_days', '35',
     'Stored anomaly scores are kept (and back-filled) for this many days.'),
    ('usage_anomaly_scores_from', NULL,
     'State: model_usage_anomaly_scores holds the scores of every complete hour in '
     '[usage_anomaly_scores_from, usage_anomaly_scores_to).'),
    ('usage_anomaly_scores_to', NULL, 'State: see usage_anomaly_scores_from.')
ON CONFLICT (key) DO NOTHING;

-- The scores from usage_anomaly_scores_min_score up, as llm_gateway_usage_anomalies returns
-- them with min_requests = 5. A few rows per hour: the anomalies and the near misses.
CREATE TABLE IF NOT EXISTS model_usage_anomaly_scores (
    hour      timestamptz      NOT NULL,
    tenant_id uuid             NOT NULL,
    metric    text             NOT NULL,
    observed  double precision NOT NULL,
    expected  double precision NOT NULL,
    score     double precision NOT NULL,
    PRIMARY KEY (hour, tenant_id, metric) INCLUDE (observed, expected, score)
);
CREATE INDEX IF NOT EXISTS model_usage_anomaly_scores_tenant
    ON model_usage_anomaly_scores (tenant_id, hour) INCLUDE (metric, observed, expected, score);
COMMENT ON TABLE model_usage_anomaly_scores IS
    'Stored anomaly scores of complete hours (see usage_anomaly_scores_from/_to); written by '
    'llm_gateway_score_usage_hours().';

-- 009's detector, kept as it was under another name: it scores any range, reading the
-- precomputed baselines where they exist and computing the others.
DO $$
BEGIN
    IF to_regprocedure('llm_gateway_usage_anomalies_computed(timestamptz, uuid, double precision,'
                       ' double precision, timestamptz)') IS NULL THEN
        ALTER FUNCTION llm_gateway_usage_anomalies(timestamptz, uuid, double precision,
                                                   double precision, timestamptz)
            RENAME TO llm_gateway_usage_anomalies_computed;
    END IF;
END $$;
COMMENT ON FUNCTION llm_gateway_usage_anomalies_computed(timestamptz, uuid, double precision,
                                                         double precision, timestamptz) IS
    'The anomaly detector computed from the tenant series (precomputed baselines where they '
    'exist); llm_gateway_usage_anomalies() uses it for hours without stored scores.';

-- ---------------------------------------------------------------------------------------------
-- Scoring
-- ---------------------------------------------------------------------------------------------

-- Stores the scores of the complete hours in [from_ts, to_ts) (within the kept days; never the
-- current hour) and extends the stored range to cover them. A range apart from the stored one
-- and after it starts the stored range anew; one before it is scored up to it (no gap).
-- Returns the number of scores stored.
CREATE OR REPLACE FUNCTION llm_gateway_score_usage_hours(from_ts timestamptz, to_ts timestamptz)
RETURNS bigint
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    this_hour   timestamptz := date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    keep_from   timestamptz := this_hour - make_interval(days => coalesce(
                    llm_gateway_setting('usage_anomaly_scores_days')::integer, 35));
    floor_score double precision := coalesce(
                    llm_gateway_setting('usage_anomaly_scores_min_score')::float8, 2);
    s_lo        timestamptz;
    s_hi        timestamptz;
    lo          timestamptz := date_trunc('hour', from_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    hi          timestamptz := date_trunc('hour', to_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    n           bigint;
BEGIN
    IF hi < to_ts THEN
        hi := hi + interval '1 hour';
    END IF;
    -- The same lock as the refresh that writes the series these scores are read from; the
    -- stored range is read under it.
    PERFORM pg_advisory_xact_lock(hashtext('llm_gateway_refresh_usage_analytics'));
    s_lo := llm_gateway_setting('usage_anomaly_scores_from')::timestamptz;
    s_hi := llm_gateway_setting('usage_anomaly_scores_to')::timestamptz;
    -- Scores past their days go, and with them the start of the stored range.
    IF s_lo < keep_from THEN
        DELETE FROM model_usage_anomaly_scores WHERE hour < keep_from;
        s_lo := keep_from;
        IF s_hi <= s_lo THEN
            s_lo := NULL;
            s_hi := NULL;
        END IF;
    END IF;
    lo := greatest(lo, keep_from);
    hi := least(hi, this_hour);
    IF lo >= hi THEN
        PERFORM llm_gateway_set_setting('usage_anomaly_scores_from', s_lo::text);
        PERFORM llm_gateway_set_setting('usage_anomaly_scores_to', s_hi::text);
        RETURN 0;
    END IF;
    IF s_lo IS NULL OR s_hi IS NULL OR lo > s_hi THEN
        s_lo := lo;
        s_hi := hi;
    ELSE
        hi := greatest(hi, least(s_lo, this_hour));  -- before the stored range: up to it
        s_lo := least(s_lo, lo);
        s_hi := greatest(s_hi, hi);
    END IF;
    DELETE FROM model_usage_anomaly_scores WHERE hour >= lo AND hour < hi;
    INSERT INTO model_usage_anomaly_scores (hour, tenant_id, metric, observed, expected, score)
    SELECT x.hour, x.tenant_id, x.metric, x.observed, x.expected, x.score
    FROM llm_gateway_usage_anomalies_computed(lo, NULL, floor_score, 5, hi) x;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM llm_gateway_set_setting('usage_anomaly_scores_from', s_lo::text);
    PERFORM llm_gateway_set_setting('usage_anomaly_scores_to', s_hi::text);
    RETURN n;
END $$;

-- 008's entry point once more: the hourly rollup, the analytics rollups, then the scores of
-- the refreshed hours of the last 8 days (their baselines are precomputed: cheap). Older hours
-- (a spool replay) are not rescored here: the stored range stops short of them, so they are
-- computed on the fly until the back-fill scores them again.
CREATE OR REPLACE FUNCTION llm_gateway_refresh_usage_hourly(from_ts timestamptz,
                                                            to_ts timestamptz)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    written bigint;
    recent  timestamptz := date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                           - interval '8 days';
    upto    timestamptz := date_trunc('hour', to_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    s_lo    timestamptz;
    s_hi    timestamptz;
BEGIN
    IF upto < to_ts THEN
        upto := upto + interval '1 hour';
    END IF;
    written := llm_gateway_refresh_usage_hourly_base(from_ts, to_ts);
    -- The count returned stays that of model_usage_hourly and model_usage_daily_totals (002).
    PERFORM llm_gateway_refresh_usage_analytics(from_ts, to_ts);
    IF from_ts < recent THEN
        s_lo := llm_gateway_setting('usage_anomaly_scores_from')::timestamptz;
        s_hi := llm_gateway_setting('usage_anomaly_scores_to')::timestamptz;
        IF s_lo < least(upto, recent) AND from_ts < s_hi THEN
            s_lo := least(greatest(upto, s_lo), recent, s_hi);
            PERFORM llm_gateway_set_setting('usage_anomaly_scores_from', s_lo::text);
        END IF;
    END IF;
    PERFORM llm_gateway_score_usage_hours(greatest(from_ts, recent), to_ts);
    RETURN written;
END $$;

-- ---------------------------------------------------------------------------------------------
-- The detector: stored scores where they cover the window, computed elsewhere
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION llm_gateway_usage_anomalies(
    since        timestamptz,
    only_tenant  uuid DEFAULT NULL,
    min_score    double precision DEFAULT 4,
    min_requests double precision DEFAULT 5,
    as_of        timestamptz DEFAULT now()
) RETURNS TABLE (tenant_id uuid, hour timestamptz, metric text, observed double precision,
                 expected double precision, score double precision)
LANGUAGE plpgsql STABLE SET jit = off AS $$
DECLARE
    lo timestamptz := date_trunc('hour', since AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    hi timestamptz := date_trunc('hour', coalesce(as_of, now()) AT TIME ZONE 'UTC')
                      AT TIME ZONE 'UTC';
    a  timestamptz := llm_gateway_setting('usage_anomaly_scores_from')::timestamptz;
    b  timestamptz := llm_gateway_setting('usage_anomaly_scores_to')::timestamptz;
BEGIN
    -- greatest/least ignore NULLs: a NULL bound (nothing stored) must stay NULL.
    a := CASE WHEN a IS NOT NULL THEN greatest(a, lo) END;
    b := CASE WHEN b IS NOT NULL THEN least(b, hi) END;
    IF a IS NULL OR b IS NULL OR a >= b OR min_requests <> 5
       OR min_score < coalesce(llm_gateway_setting('usage_anomaly_scores_min_score')::float8, 2)
    THEN
        RETURN QUERY SELECT * FROM llm_gateway_usage_anomalies_computed(
            since, only_tenant, min_score, min_requests, as_of);
        RETURN;
    END IF;
    -- In hour order: the hours before the stored range, the stored ones, the hours after it.
    IF lo < a THEN
        RETURN QUERY SELECT * FROM llm_gateway_usage_anomalies_computed(
            lo, only_tenant, min_score, min_requests, a);
    END IF;
    -- Two statements rather than "only_tenant IS NULL OR ...": each has its own index plan.
    IF only_tenant IS NULL THEN
        RETURN QUERY
        SELECT s.tenant_id, s.hour, s.metric, s.observed, s.expected, s.score
        FROM model_usage_anomaly_scores s
        WHERE s.hour >= a AND s.hour < b AND s.score >= min_score
        ORDER BY s.hour, s.tenant_id, s.metric;
    ELSE
        RETURN QUERY
        SELECT s.tenant_id, s.hour, s.metric, s.observed, s.expected, s.score
        FROM model_usage_anomaly_scores s
        WHERE s.tenant_id = only_tenant AND s.hour >= a AND s.hour < b
          AND s.score >= min_score
        ORDER BY s.hour, s.metric;
    END IF;
    IF b < hi THEN
        RETURN QUERY SELECT * FROM llm_gateway_usage_anomalies_computed(
            b, only_tenant, min_score, min_requests, hi);
    END IF;
END $$;
COMMENT ON FUNCTION llm_gateway_usage_anomalies(timestamptz, uuid, double precision,
                                                double precision, timestamptz) IS
    'Hourly cost, requests and error-rate anomalies per tenant against its hour-of-week '
    'baseline (median/MAD of the last 4 weeks); stored scores where maintenance has them, '
    'computed otherwise; the current hour is not scored.';

-- ---------------------------------------------------------------------------------------------
-- Back-fill
-- ---------------------------------------------------------------------------------------------

-- What is left: the days the daily rollups lack, and the hours whose scores are not stored.
CREATE OR REPLACE FUNCTION llm_gateway_usage_analytics_backfill_state(
    OUT rollups_pending_before date,   -- NULL: the daily rollups are complete
    OUT rollup_days_left       integer,
    OUT scores_from            timestamptz,
    OUT scores_to              timestamptz,
    OUT score_days_left        integer
)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    this_hour timestamptz := date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    oldest    date;
    target    timestamptz;
BEGIN
    rollups_pending_before := llm_gateway_setting('usage_analytics_backfill_before')::date;
    rollup_days_left := 0;
    IF rollups_pending_before IS NOT NULL THEN
        SELECT (min(h.hour) AT TIME ZONE 'UTC')::date INTO oldest FROM model_usage_hourly h;
        -- Not the days whose raw rows retention dropped: recomputed, they would come back empty.
        oldest := greatest(oldest,
                           (llm_gateway_usage_retention_cutoff() AT TIME ZONE 'UTC')::date);
        rollup_days_left := coalesce(greatest(rollups_pending_before - oldest, 0), 0);
    END IF;
    scores_from := llm_gateway_setting('usage_anomaly_scores_from')::timestamptz;
    scores_to := llm_gateway_setting('usage_anomaly_scores_to')::timestamptz;
    -- Scores go back to the kept days, or to the first hour of any tenant's series.
    SELECT greatest(min(t.hour), this_hour - make_interval(days => coalesce(
               llm_gateway_setting('usage_anomaly_scores_days')::integer, 35)))
    INTO target FROM model_usage_tenant_hourly t;
    score_days_left := CASE
        WHEN target IS NULL THEN 0
        ELSE greatest(ceil(extract(epoch FROM coalesce(scores_from, this_hour) - target)
                           / 86400), 0)::integer END;
END $$;

-- One batch: up to `days` whole days of the daily rollups (newest first), or, once they are
-- complete, up to `days` days of anomaly scores before the stored ones. Call it on its own
-- (one transaction per batch) until part = 'done'.
CREATE OR REPLACE FUNCTION llm_gateway_backfill_usage_analytics(
    days          integer DEFAULT 1,
    OUT part      text,         -- 'rollups', 'anomaly scores' or 'done'
    OUT done_from timestamptz,  -- that part is complete from this instant on
    OUT days_left integer       -- days of that part still to do
)
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    st        record;
    this_hour timestamptz := date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    d_hi      date;
    d_lo      date;
    s_lo      timestamptz;
BEGIN
    IF days < 1 THEN
        RAISE EXCEPTION 'days must be >= 1';
    END IF;
    -- One batch at a time (maintenance and `db backfill` may overlap); the state is read under
    -- the lock.
    PERFORM pg_advisory_xact_lock(hashtext('llm_gateway_refresh_usage_analytics'));
    SELECT * INTO st FROM llm_gateway_usage_analytics_backfill_state();
    IF st.rollups_pending_before IS NOT NULL THEN
        part := 'rollups';
        d_hi := st.rollups_pending_before;
        d_lo := greatest(d_hi - days, d_hi - st.rollup_days_left);
        IF d_lo < d_hi THEN
            -- Whole days from raw rows (or by difference for the working set's days).
            PERFORM llm_gateway_refresh_usage_analytics(d_lo::timestamp AT TIME ZONE 'UTC',
                                                        d_hi::timestamp AT TIME ZONE 'UTC');
        END IF;
        days_left := st.rollup_days_left - (d_hi - d_lo);
        IF days_left <= 0 THEN
            days_left := 0;
            PERFORM llm_gateway_set_setting('usage_analytics_backfill_before', NULL);
        ELSE
            PERFORM llm_gateway_set_setting('usage_analytics_backfill_before', d_lo::text);
        END IF;
        done_from := d_lo::timestamp AT TIME ZONE 'UTC';
        RETURN;
    END IF;
    IF st.score_days_left > 0 THEN
        part := 'anomaly scores';
        s_lo := coalesce(st.scores_from, this_hour);
        PERFORM llm_gateway_score_usage_hours(
            greatest(s_lo - make_interval(days => days),
                     s_lo - make_interval(days => st.score_days_left)),
            s_lo);
        SELECT * INTO st FROM llm_gateway_usage_analytics_backfill_state();
        done_from := st.scores_from;
        days_left := st.score_days_left;
        RETURN;
    END IF;
    part := 'done';
    days_left := 0;
END $$;
COMMENT ON FUNCTION llm_gateway_backfill_usage_analytics(integer) IS
    'One batch of the analytics back-fill (daily rollups, then anomaly scores); call it until '
    'part = ''done''. `llm-gateway db backfill` does, with progress.';

-- ---------------------------------------------------------------------------------------------
-- Maintenance: 009's, plus a batch of back-fill per run
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
    backfill    integer := coalesce(
                    llm_gateway_setting('usage_analytics_backfill_days_per_run')::integer, 1);
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

    -- Only once the rollup has caught up (the first runs on old rows go a week at a time). A
    -- failure must not undo the upkeep above; the next run tries again.
    IF backfill > 0 AND rollup_to >= this_hour THEN
        BEGIN
            PERFORM llm_gateway_backfill_usage_analytics(backfill);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'llm_gateway_maintain_usage: analytics back-fill not done: %', SQLERRM;
        END;
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
    'Usage upkeep: monthly partitions ahead, retention, rollup refresh (with the stored anomaly '
    'scores of its hours), daily ANALYZE, a batch of the analytics back-fill while one is '
    'pending, announcement of new usage anomalies. Run every few minutes (the SDK does; or '
    'pg_cron).';
