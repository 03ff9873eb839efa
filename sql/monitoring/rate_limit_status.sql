-- Rate-limit status: per provider, how many of the tenant's requests in the last 24 hours were
-- rate limited (status = 'rate_limit'), their share, and when it last happened.
--
--   psql "$DATABASE_URL" -v tenant_id=<tenant uuid> -f sql/monitoring/rate_limit_status.sql
SELECT provider,
       COUNT(*) AS requests,
       COUNT(*) FILTER (WHERE status = 'rate_limit') AS rate_limited,
       ROUND(100.0 * COUNT(*) FILTER (WHERE status = 'rate_limit') / COUNT(*), 2)
           AS rate_limited_pct,
       MAX("timestamp") FILTER (WHERE status = 'rate_limit') AS last_rate_limited_at
FROM model_usage_stats
WHERE tenant_id = :'tenant_id'
  AND "timestamp" >= NOW() - INTERVAL '24 hours'
GROUP BY provider
ORDER BY rate_limited DESC, provider;
