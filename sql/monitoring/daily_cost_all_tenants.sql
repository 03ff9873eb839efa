-- Daily cost per provider across all tenants: the last 30 UTC days, today included. Raw table:
-- reads every row of the window, so prefer daily_cost_all_tenants_rollup.sql on a big table.
--
--   psql "$DATABASE_URL" -f sql/monitoring/daily_cost_all_tenants.sql
--
-- cost_usd leaves out requests without a known price; unpriced counts them. Days are UTC.
SELECT ("timestamp" AT TIME ZONE 'UTC')::date AS day_utc,
       provider,
       COUNT(*) AS requests,
       SUM(total_tokens) AS tokens,
       SUM(estimated_cost_usd) AS cost_usd,
       COUNT(*) FILTER (WHERE estimated_cost_usd IS NULL) AS unpriced
FROM model_usage_stats
WHERE "timestamp" >= ((NOW() AT TIME ZONE 'UTC')::date - 29)::timestamp AT TIME ZONE 'UTC'
GROUP BY day_utc, provider
ORDER BY day_utc, provider;
