-- Cost of one session of a tenant (index model_usage_stats_session).
--
--   psql "$DATABASE_URL" -v tenant_id=<tenant uuid> -v session_id=<session> \
--        -f sql/monitoring/session_cost.sql
SELECT session_id,
       COUNT(*) AS requests,
       SUM(input_tokens)::bigint AS input_tokens,
       SUM(output_tokens)::bigint AS output_tokens,
       SUM(estimated_cost_usd) AS cost_usd,
       COUNT(*) FILTER (WHERE status <> 'success') AS errors,
       MIN("timestamp") AS first_at,
       MAX("timestamp") AS last_at
FROM model_usage_stats
WHERE tenant_id = :'tenant_id'
  AND session_id = :'session_id'
GROUP BY session_id;
