-- Per-key quotas (virtual keys, issue #14): usage rows carry the virtual key that made them,
-- and a key's spend is counted like the tenant's, so its budget is shared by every process
-- through the same leases (see llm_gateway/governance/keys.py).

-- Which virtual key made the request (NULL: none). model_usage_stats is partitioned: the
-- column reaches every partition, present and future. No index of its own: a key's spend is
-- read from the counters below, and from its rows only for a period under an hour, found
-- through the tenant's (tenant_id, "timestamp") index like a user's.
ALTER TABLE model_usage_stats ADD COLUMN IF NOT EXISTS virtual_key_id text;

-- Spend counters gain one subject per key: 'k:<virtual_key_id>' (next to '' the tenant and
-- 's' its system-key use). Rows without a key add nothing: the NULL subject is skipped.
CREATE OR REPLACE FUNCTION llm_gateway_count_spend() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- new_rows holds only rows actually inserted: a replayed or retried row that ON CONFLICT
    -- DO NOTHING skipped is not counted twice. Sorted so concurrent writers lock in one order.
    INSERT INTO usage_spend_counters AS c (tenant_id, subject, grain, bucket, cost_usd)
    SELECT r.tenant_id, s.subject, g.grain,
           date_trunc(g.unit, r."timestamp", 'UTC'), sum(r.estimated_cost_usd)
      FROM new_rows r
     CROSS JOIN LATERAL (VALUES (''), (CASE WHEN r.key_source = 'system' THEN 's' END),
                                ('k:' || r.virtual_key_id))
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

-- Budget renewals read a key's rows when asked ("virtual_key_id" in a "rows" request);
-- otherwise as in 005_governance.sql.
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
            -- A user's or a key's spend, or a period shorter than an hour: from the rows.
            SELECT coalesce(sum(estimated_cost_usd), 0) INTO committed FROM model_usage_stats
             WHERE tenant_id = (r ->> 'tenant_id')::uuid
               AND "timestamp" >= (r ->> 'start')::timestamptz
               AND "timestamp" < (r ->> 'end')::timestamptz
               AND (r ->> 'user_id' IS NULL OR user_id = r ->> 'user_id')
               AND (r ->> 'virtual_key_id' IS NULL
                    OR virtual_key_id = r ->> 'virtual_key_id')
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
