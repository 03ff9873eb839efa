-- Hourly anomalies of every tenant over the last 24 complete hours (cost, requests, error
-- rate against the tenant's hour-of-week baseline; see llm_gateway_usage_anomalies in
-- migrations 008 and 012: read from the scores maintenance stores for each complete hour).
-- One tenant: pass its uuid instead of NULL.
--
--   psql "$DATABASE_URL" -f sql/monitoring/usage_anomalies.sql
SELECT tenant_id, hour, metric,
       round(observed::numeric, 4) AS observed,
       round(expected::numeric, 4) AS expected,
       round(score::numeric, 1) AS score
FROM llm_gateway_usage_anomalies(NOW() - interval '24 hours', NULL, 4)
ORDER BY score DESC;
