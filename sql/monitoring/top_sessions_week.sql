-- The 20 most expensive sessions of a tenant over the last 7 days (index-only scan of
-- model_usage_stats_session_time).
--
--   psql "$DATABASE_URL" -v tenant_id=<tenant uuid> -f sql/monitoring/top_sessions_week.sql
SELECT session_id,
       COUNT(*) AS requests,
       SUM(estimated_cost_usd) AS cost_usd
FROM model_usage_stats
WHERE tenant_id = :'tenant_id'
  AND session_id IS NOT NULL
  AND "timestamp" >= NOW() - interval '7 days'
GROUP BY session_id
ORDER BY cost_usd DESC NULLS LAST, session_id
LIMIT 20;
