-- Daily cost per provider for one tenant over the last 30 UTC days, from the hourly rollup.
-- Same columns and, for hours the rollup has refreshed, the same numbers as daily_cost.sql.
-- The rollup is recomputed by llm_gateway_maintain_usage() (every few minutes), so the last
-- minutes may be missing until its next run.
--
--   psql "$DATABASE_URL" -v tenant_id=<tenant uuid> -f sql/monitoring/daily_cost_rollup.sql
SELECT (hour AT TIME ZONE 'UTC')::date AS day_utc,
       provider,
       SUM(requests)::bigint AS requests,
       SUM(total_tokens)::bigint AS tokens,
       SUM(cost_usd) AS cost_usd,
       SUM(unpriced_requests)::bigint AS unpriced
FROM model_usage_hourly
WHERE tenant_id = :'tenant_id'
  AND hour >= ((NOW() AT TIME ZONE 'UTC')::date - 29)::timestamp AT TIME ZONE 'UTC'
GROUP BY day_utc, provider
ORDER BY day_utc, provider;
