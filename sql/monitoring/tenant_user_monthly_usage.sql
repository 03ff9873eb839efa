-- Usage of one user of a tenant in the current UTC month per provider and model, from the
-- per-user daily rollup (tracker.get_monthly_usage(tenant_id, user_id=...)).
--
--   psql "$DATABASE_URL" -v tenant_id=<tenant uuid> -v user_id=<user> \
--        -f sql/monitoring/tenant_user_monthly_usage.sql
SELECT provider,
       model_name,
       SUM(requests)::bigint AS requests,
       SUM(input_tokens)::bigint AS input_tokens,
       SUM(output_tokens)::bigint AS output_tokens,
       SUM(cost_usd) AS cost_usd,
       COALESCE(SUM(requests) FILTER (WHERE status <> 'success'), 0)::bigint AS errors,
       SUM(unpriced_requests)::bigint AS unpriced
FROM model_usage_user_daily
WHERE tenant_id = :'tenant_id'
  AND user_id = :'user_id'
  AND day >= date_trunc('month', NOW() AT TIME ZONE 'UTC')::date
  AND day < (date_trunc('month', NOW() AT TIME ZONE 'UTC') + interval '1 month')::date
GROUP BY provider, model_name
ORDER BY cost_usd DESC NULLS LAST, provider, model_name;
