-- Daily cost per provider across all tenants over the last 30 UTC days, from the all-tenant
-- daily rollup (model_usage_daily_totals). Same numbers as daily_cost_all_tenants.sql for the
-- hours the rollup has refreshed; it is recomputed by llm_gateway_maintain_usage() every few
-- minutes, so the last minutes may be missing until its next run.
--
--   psql "$DATABASE_URL" -f sql/monitoring/daily_cost_all_tenants_rollup.sql
SELECT day AS day_utc,
       provider,
       SUM(requests)::bigint AS requests,
       SUM(total_tokens)::bigint AS tokens,
       SUM(cost_usd) AS cost_usd,
       SUM(unpriced_requests)::bigint AS unpriced
FROM model_usage_daily_totals
WHERE day >= (NOW() AT TIME ZONE 'UTC')::date - 29
GROUP BY day, provider
ORDER BY day, provider;
