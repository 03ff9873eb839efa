-- Usage of one tenant in the current UTC month per provider and model, from the hourly rollup
-- (what tracker.get_monthly_usage(tenant_id) returns). Another month: change the two bounds,
-- or query the view tenant_monthly_usage filtered on tenant_id and month.
--
--   psql "$DATABASE_URL" -v tenant_id=<tenant uuid> -f sql/monitoring/tenant_monthly_usage.sql
SELECT provider,
       model_name,
       SUM(requests)::bigint AS requests,
       SUM(input_tokens)::bigint AS input_tokens,
       SUM(output_tokens)::bigint AS output_tokens,
       SUM(cost_usd) AS cost_usd,
       COALESCE(SUM(requests) FILTER (WHERE status <> 'success'), 0)::bigint AS errors,
       SUM(unpriced_requests)::bigint AS unpriced
FROM model_usage_hourly
WHERE tenant_id = :'tenant_id'
  AND hour >= date_trunc('month', NOW() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
  AND hour < (date_trunc('month', NOW() AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC'
GROUP BY provider, model_name
ORDER BY cost_usd DESC NULLS LAST, provider, model_name;
