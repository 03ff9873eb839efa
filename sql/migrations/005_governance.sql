-- Governance: spend counters fed by the usage rows themselves, and leases through which every
-- router process shares each budget and rate limit (see docs/design/governance.md).

-- Spend per tenant, per subject and per time grain, maintained from inserted usage rows by the
-- trigger below: spend travels with the usage batches, and spooled rows count when replayed.
-- subject: '' the tenant as a whole, 's' the tenant's system-key use. grain: 'h' hour, 'd' day,
-- 'M' calendar month (all UTC). Per-user and sub-hour spend is read from the rows themselves
-- (a user's rows of a period, an hour of a tenant's rows): counting them here too made each
-- 5,000-row batch 2-3x slower to write (docs/design/governance.md).
CREATE TABLE IF NOT EXISTS usage_spend_counters (
    tenant_id uuid        NOT NULL,
    subject   text        NOT NULL,
    grain     text        NOT NULL,
    bucket    timestamptz NOT NULL,
    cost_usd  numeric     NOT NULL,
    PRIMARY KEY (tenant_id, subject, grain, bucket)
);

CREATE OR REPLACE FUNCTION llm_gateway_count_spend() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- new_rows holds only rows actually inserted: a replayed or retried row that ON CONFLICT
    -- DO NOTHING skipped is not counted twice. Sorted so concurrent writers lock in one order.
    INSERT INTO usage_spend_counters AS c (tenant_id, subject, grain, bucket, cost_usd)
    SELECT r.tenant_id, s.subject, g.grain,
           date_trunc(g.unit, r."timestamp", 'UTC'), sum(r.estimated_cost_usd)
      FROM new_rows r
     CROSS JOIN LATERAL (VALUES (''), (CASE WHEN r.key_source = 'system' THEN 's' END))
                s (subject)
     CROSS JOIN (VALUES ('h', 'hour'), ('d', 'day'), ('M', 'month'))
                g (grain, unit)
     WHERE s.subject IS NOT NULL AND r.estimated_cost_usd > 0
     GROUP BY 1, 2, 3, 4
     ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant_id, subject, grain, bucket)
    DO UPDATE SET cost_usd = c.cost_usd + excluded.cost_usd;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS llm_gateway_count_spend ON model_usage_stats;
CREATE TRIGGER llm_gateway_count_spend
    AFTER INSERT ON model_usage_stats
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION llm_gateway_count_spend();

-- What each live process holds of each limit: requests, tokens or US dollars.
CREATE TABLE IF NOT EXISTS quota_leases (
    limit_key  text             NOT NULL,
    holder     uuid             NOT NULL,
    amount     double precision NOT NULL,
    granted_at timestamptz      NOT NULL,
    expires_at timestamptz      NOT NULL,
    PRIMARY KEY (limit_key, holder)
);

-- Uses of rate limits, reconciled by the processes, per bucket of time (second or minute).
CREATE TABLE IF NOT EXISTS quota_uses (
    limit_key text             NOT NULL,
    bucket    timestamptz      NOT NULL,
    amount    double precision NOT NULL,
    PRIMARY KEY (limit_key, bucket)
);

-- Renews every lease one process asks for, in one statement. p_requests is a JSON array of
--   {"key", "kind": "rate", "limit", "window_s", "bucket_s", "want", "uses": [[epoch_s, n], ...]}
--   {"key", "kind": "budget", "limit", "tenant_id", "subject", "grain", "start", "end", "want"}
--   {"key", "kind": "budget", "source": "rows", "limit", "tenant_id", "user_id", "system_only",
--    "start", "end", "want"}
-- "want" is the whole amount the process wants to hold from now on (what it still holds
-- unused plus more); for rates, "uses" are the slots it used since its last renewal, by bucket.
-- Returns, per key: granted (the new lease), committed (uses in the window, or spend in the
-- period), others and holders (what other live processes hold, and how many they are), oldest
-- (rates: the epoch of the oldest use still in the window) and now (the server's clock).
CREATE OR REPLACE FUNCTION llm_gateway_quota_renew(
    p_holder uuid, p_ttl_s double precision, p_requests jsonb
) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r          jsonb;
    k          text;
    now_       timestamptz := clock_timestamp();
    bucket_s   double precision;
    committed  double precision;
    others     double precision;
    granted    double precision;
    holders    integer;
    oldest     double precision;
    result     jsonb := '[]'::jsonb;
BEGIN
    -- Keys in one order in every process: no deadlock between two renewals.
    FOR r IN SELECT e FROM jsonb_array_elements(p_requests) e ORDER BY e ->> 'key' LOOP
        k := r ->> 'key';
        PERFORM pg_advisory_xact_lock(hashtextextended('llm_gateway_quota:' || k, 0));
        IF r ->> 'kind' = 'rate' THEN
            bucket_s := (r ->> 'bucket_s')::double precision;
            -- Leases of processes that stopped renewing: when their slots were used is
            -- unknown, so they count as used when granted (the safe side).
            WITH gone AS (
                DELETE FROM quota_leases
                 WHERE limit_key = k AND expires_at < now_ AND holder <> p_holder
                RETURNING amount, granted_at
            )
            INSERT INTO quota_uses AS u (limit_key, bucket, amount)
            SELECT k, to_timestamp(floor(extract(epoch FROM granted_at) / bucket_s) * bucket_s),
                   sum(amount)
              FROM gone GROUP BY 2
            ON CONFLICT (limit_key, bucket) DO UPDATE SET amount = u.amount + excluded.amount;
            INSERT INTO quota_uses AS u (limit_key, bucket, amount)
            SELECT k, to_timestamp(floor((x ->> 0)::double precision / bucket_s) * bucket_s),
                   sum((x ->> 1)::double precision)
              FROM jsonb_array_elements(coalesce(r -> 'uses', '[]')) x
             GROUP BY 2
            ON CONFLICT (limit_key, bucket) DO UPDATE SET amount = u.amount + excluded.amount;
            DELETE FROM quota_uses
             WHERE limit_key = k
               AND bucket < now_ - make_interval(secs => (r ->> 'window_s')::double precision
                                                         + 2 * bucket_s);
            -- A partial bucket counts whole: rounding never lets a window hold more.
            SELECT coalesce(sum(amount), 0) INTO committed FROM quota_uses
             WHERE limit_key = k
               AND bucket > now_ - make_interval(secs => (r ->> 'window_s')::double precision
                                                         + bucket_s);
            SELECT extract(epoch FROM min(bucket)) INTO oldest FROM quota_uses
             WHERE limit_key = k
               AND bucket > now_ - make_interval(secs => (r ->> 'window_s')::double precision
                                                         + bucket_s);
        ELSIF r ->> 'source' = 'rows' THEN
            -- A user's spend, or a period shorter than an hour: read from the rows.
            SELECT coalesce(sum(estimated_cost_usd), 0) INTO committed FROM model_usage_stats
             WHERE tenant_id = (r ->> 'tenant_id')::uuid
               AND "timestamp" >= (r ->> 'start')::timestamptz
               AND "timestamp" < (r ->> 'end')::timestamptz
               AND (r ->> 'user_id' IS NULL OR user_id = r ->> 'user_id')
               AND (NOT coalesce((r ->> 'system_only')::boolean, false)
                    OR key_source = 'system');
        ELSE
            SELECT coalesce(sum(cost_usd), 0) INTO committed FROM usage_spend_counters
             WHERE tenant_id = (r ->> 'tenant_id')::uuid AND subject = r ->> 'subject'
               AND grain = r ->> 'grain'
               AND bucket >= (r ->> 'start')::timestamptz AND bucket < (r ->> 'end')::timestamptz;
        END IF;
        SELECT coalesce(sum(amount), 0), count(*) INTO others, holders FROM quota_leases
         WHERE limit_key = k AND holder <> p_holder AND expires_at >= now_;
        granted := greatest(0, least((r ->> 'want')::double precision,
                                     (r ->> 'limit')::double precision - committed - others));
        IF granted > 0 THEN
            INSERT INTO quota_leases (limit_key, holder, amount, granted_at, expires_at)
            VALUES (k, p_holder, granted, now_, now_ + make_interval(secs => p_ttl_s))
            ON CONFLICT (limit_key, holder) DO UPDATE
               SET amount = excluded.amount, granted_at = excluded.granted_at,
                   expires_at = excluded.expires_at;
        ELSE
            DELETE FROM quota_leases WHERE limit_key = k AND holder = p_holder;
        END IF;
        result := result || jsonb_build_object(
            'key', k, 'granted', granted, 'committed', committed, 'others', others,
            'holders', holders, 'oldest', oldest, 'now', extract(epoch FROM now_));
        oldest := NULL;
    END LOOP;
    RETURN result;
END
$$;

-- Gives back everything one process holds (its clean shutdown).
CREATE OR REPLACE FUNCTION llm_gateway_quota_release(p_holder uuid) RETURNS integer
LANGUAGE sql AS $$
    WITH gone AS (DELETE FROM quota_leases WHERE holder = p_holder RETURNING 1)
    SELECT count(*)::integer FROM gone;
$$;

-- Drops counters and uses no limit can read any more (run by maintenance).
CREATE OR REPLACE FUNCTION llm_gateway_prune_quota() RETURNS void
LANGUAGE sql AS $$
    DELETE FROM usage_spend_counters
     WHERE (grain = 'h' AND bucket < now() - interval '2 days')
        OR (grain = 'd' AND bucket < now() - interval '62 days')
        OR (grain = 'M' AND bucket < now() - interval '25 months');
    DELETE FROM quota_uses WHERE bucket < now() - interval '2 days';
    DELETE FROM quota_leases WHERE expires_at < now() - interval '1 day';
$$;

-- Budget alerts: one row per tenant, scope, user, period and threshold, whichever process
-- noticed first (the unique index decides); that process also sends the NOTIFY.
CREATE TABLE IF NOT EXISTS budget_events (
    id           bigserial   PRIMARY KEY,
    tenant_id    uuid        NOT NULL,
    scope        text        NOT NULL,
    user_id      text,
    period_start timestamptz NOT NULL,
    threshold    double precision NOT NULL,
    spent_usd    numeric     NOT NULL,
    max_usd      numeric     NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS budget_events_once
    ON budget_events (tenant_id, scope, (coalesce(user_id, '')), period_start, threshold);
