-- The models each endpoint of a tenant used over the last 30 days: cost per 1,000 requests,
-- success rate, p50/p95 latency of successful attempts, the token mix. The input of the
-- model-switch recommendations (llm-gateway usage recommend), which add the candidates the
-- tenant's keys reach and their prices.
--
--   psql "$DATABASE_URL" -v tenant_id=<tenant uuid> -f sql/monitoring/models_by_endpoint.sql
SELECT endpoint,
       provider,
       model_name,
       COUNT(*) AS requests,
       round(1000 * SUM(estimated_cost_usd) / COUNT(*), 4) AS cost_per_1k_requests,
       round(COUNT(*) FILTER (WHERE status = 'success')::numeric / COUNT(*), 4) AS success_rate,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms)
           FILTER (WHERE status = 'success') AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms)
           FILTER (WHERE status = 'success') AS p95_ms,
       SUM(input_tokens)::bigint AS input_tokens,
       SUM(output_tokens)::bigint AS output_tokens
FROM model_usage_stats
WHERE tenant_id = :'tenant_id'
  AND "timestamp" >= NOW() - interval '30 days'
GROUP BY endpoint, provider, model_name
ORDER BY endpoint, SUM(estimated_cost_usd) DESC NULLS LAST;
