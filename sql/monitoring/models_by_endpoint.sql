-- The models each endpoint of a tenant used over the last 30 days (from the UTC day 30 days
-- back): cost per 1,000 requests, success rate, p50/p95 latency of successful attempts, the
-- token mix. The input of the model-switch recommendations (llm-gateway usage recommend),
-- which add the candidates the tenant's keys reach and their prices. Served from the daily
-- rollups of migration 009; latencies come from a histogram with buckets 15 % wide (each
-- percentile within 7.5 %).
--
--   psql "$DATABASE_URL" -v tenant_id=<tenant uuid> -f sql/monitoring/models_by_endpoint.sql
WITH uses AS (
    SELECT endpoint, provider, model_name,
           SUM(requests) AS requests,
           SUM(successes) AS successes,
           SUM(cost_usd) AS cost_usd,
           SUM(unpriced_requests) AS unpriced,
           SUM(ok_input_tokens)::bigint AS input_tokens,
           SUM(ok_output_tokens)::bigint AS output_tokens
    FROM model_usage_endpoint_daily
    WHERE tenant_id = :'tenant_id'
      AND day >= (NOW() AT TIME ZONE 'UTC')::date - 30
    GROUP BY endpoint, provider, model_name
),
cumulative AS (
    SELECT endpoint, provider, model_name, bucket,
           SUM(SUM(successes)) OVER (PARTITION BY endpoint, provider, model_name
                                     ORDER BY bucket) AS upto,
           SUM(SUM(successes)) OVER (PARTITION BY endpoint, provider, model_name) AS total
    FROM model_usage_latency_daily
    WHERE tenant_id = :'tenant_id'
      AND day >= (NOW() AT TIME ZONE 'UTC')::date - 30
    GROUP BY endpoint, provider, model_name, bucket
),
percentiles AS (
    SELECT endpoint, provider, model_name,
           MIN(bucket) FILTER (WHERE upto >= 0.5 * total) AS b50,
           MIN(bucket) FILTER (WHERE upto >= 0.95 * total) AS b95
    FROM cumulative
    GROUP BY endpoint, provider, model_name
)
SELECT NULLIF(u.endpoint, '') AS endpoint,
       u.provider,
       u.model_name,
       u.requests,
       CASE WHEN u.unpriced < u.requests
            THEN round(1000 * u.cost_usd / u.requests, 4) END AS cost_per_1k_requests,
       round(u.successes::numeric / u.requests, 4) AS success_rate,
       round(power(1.15, p.b50 + 0.5)::numeric, 1) AS p50_ms,
       round(power(1.15, p.b95 + 0.5)::numeric, 1) AS p95_ms,
       u.input_tokens,
       u.output_tokens
FROM uses u
LEFT JOIN percentiles p USING (endpoint, provider, model_name)
ORDER BY u.endpoint, CASE WHEN u.unpriced < u.requests THEN u.cost_usd END DESC NULLS LAST;
