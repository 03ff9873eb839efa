-- Usage by tenant: requests, tokens, cost and average latency per provider and model over the
-- last 24 hours, busiest first. Raw table (exact window), served by the (tenant_id, timestamp)
-- covering index.
--
--   psql "$DATABASE_URL" -v tenant_id=<tenant uuid> -f sql/monitoring/usage_by_tenant.sql
--
-- tokens and cost_usd leave out rows the provider reported no tokens for or that have no known
-- price (SUM skips NULLs).
SELECT provider, model_name, COUNT(*) as requests, SUM(total_tokens) as tokens,
       SUM(estimated_cost_usd) as cost_usd, AVG(latency_ms) as avg_latency
FROM model_usage_stats WHERE tenant_id = :'tenant_id' AND timestamp >= NOW() - INTERVAL '24 hours'
GROUP BY provider, model_name ORDER BY requests DESC;
