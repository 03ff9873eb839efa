-- Error analysis: the tenant's failed attempts in the last 24 hours (every status other than
-- 'success': error, rate_limit, timeout, auth_error, cancelled), grouped by provider, model,
-- status and message, most frequent first. Uses the partial index on non-success rows.
--
--   psql "$DATABASE_URL" -v tenant_id=<tenant uuid> -f sql/monitoring/error_analysis.sql
SELECT provider,
       model_name,
       status,
       error_message,
       COUNT(*) AS occurrences,
       MIN("timestamp") AS first_seen,
       MAX("timestamp") AS last_seen
FROM model_usage_stats
WHERE tenant_id = :'tenant_id'
  AND status <> 'success'
  AND "timestamp" >= NOW() - INTERVAL '24 hours'
GROUP BY provider, model_name, status, error_message
ORDER BY occurrences DESC, last_seen DESC;
