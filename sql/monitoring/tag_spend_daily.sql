-- Spend of a tenant by tag and UTC day over the last 30 days, from the daily rollup
-- model_usage_tag_daily (migration 009; refreshed by llm_gateway_maintain_usage() every few
-- minutes). A row with two tags counts in both. One tag only: add  AND tag = '<tag>'.
--
--   psql "$DATABASE_URL" -v tenant_id=<tenant uuid> -f sql/monitoring/tag_spend_daily.sql
SELECT day AS day_utc,
       tag,
       requests,
       CASE WHEN unpriced_requests < requests THEN cost_usd END AS cost_usd
FROM model_usage_tag_daily
WHERE tenant_id = :'tenant_id'
  AND day >= (NOW() AT TIME ZONE 'UTC')::date - 29
ORDER BY day_utc, cost_usd DESC NULLS LAST, tag;
