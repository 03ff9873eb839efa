-- Daily cost per provider for one tenant: the last 30 UTC days, today included. Raw table.
-- daily_cost_rollup.sql gives the same rows from model_usage_hourly, faster for big tenants.
--
--   psql "$DATABASE_URL" -v tenant_id=<tenant uuid> -f sql/monitoring/daily_cost.sql
--
-- cost_usd leaves out requests without a known price; unpriced counts them.
-- Days are UTC whatever the session TimeZone; the day expression matches the extended
-- statistics of migration 002, so the planner knows how many days there are.
SELECT ("timestamp" AT TIME ZONE 'UTC')::date AS day_utc,
       provider,
       COUNT(*) AS requests,
       SUM(total_tokens) AS tokens,
       SUM(estimated_cost_usd) AS cost_usd,
       COUNT(*) FILTER (WHERE estimated_cost_usd IS NULL) AS unpriced
FROM model_usage_stats
WHERE tenant_id = :'tenant_id'
  AND "timestamp" >= ((NOW() AT TIME ZONE 'UTC')::date - 29)::timestamp AT TIME ZONE 'UTC'
GROUP BY day_utc, provider
ORDER BY day_utc, provider;
