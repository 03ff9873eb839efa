"""The rows bench_queries.py generates: 1,000 skewed tenants over 90 days (see its docstring)."""

from __future__ import annotations

DAYS = 90
TENANTS = 1000
CHUNK = 500_000
TYPICAL_TENANT = 500  # tenants are numbered by decreasing volume: 500 is the median one
HEAVY_TENANT = 0

# One row per attempt. $1/$2: first and last g of the chunk, $3: total rows, $4: start time.
GENERATE = """
INSERT INTO model_usage_stats
    (id, tenant_id, user_id, provider, model_name, endpoint, input_tokens, output_tokens,
     latency_ms, estimated_cost_usd, status, error_message, "timestamp", request_id,
     requested_model, attempt, key_source, input_price_per_m, output_price_per_m, price_known,
     session_id, tags)
SELECT gen_random_uuid(),
       md5('bench-tenant-' || r.k)::uuid,
       'user-' || (r.g % 997),
       m.provider,
       m.model,
       'chat.completions',
       tok.input_tokens,
       tok.output_tokens,
       CASE s.status WHEN 'success' THEN 150 + (random() * 2500)::int
                     WHEN 'timeout' THEN 30000
                     ELSE 20 + (random() * 300)::int END,
       round((tok.input_tokens * m.in_price + tok.output_tokens * m.out_price) / 1e6, 6),
       s.status,
       CASE s.status WHEN 'success' THEN NULL
                     WHEN 'rate_limit' THEN 'Rate limit reached for requests per minute'
                     WHEN 'timeout' THEN 'Request timed out after 30s'
                     WHEN 'auth_error' THEN 'Invalid API key'
                     WHEN 'cancelled' THEN 'Client disconnected'
                     ELSE (ARRAY['Upstream returned 500', 'Bad gateway',
                                 'Malformed response body'])[1 + (r.g % 3)] END,
       $4::timestamptz + ((r.g - 1)::float8 / $3) * interval '90 days',
       gen_random_uuid(),
       m.model,
       1,
       CASE WHEN r.g % 4 = 0 THEN 'platform' ELSE 'tenant' END,
       m.in_price,
       m.out_price,
       m.in_price IS NOT NULL,
       -- 70 % of rows in a session: one per tenant and 2,000 consecutive rows overall.
       CASE WHEN r.g % 10 < 7 THEN 'sess-' || r.k || '-' || (r.g / 2000) END,
       -- Half the rows tagged with one of five tags, a third of those also 'beta'.
       CASE WHEN r.g % 2 = 0 THEN
           ARRAY[(ARRAY['chat', 'search', 'summarise', 'agent', 'eval'])[1 + (r.g / 2) % 5]]
           || CASE WHEN r.g % 3 = 0 THEN ARRAY['beta'] ELSE '{}'::text[] END END
FROM (SELECT g,
             floor(1000 * power(random(), 3))::int AS k,
             (random() * 100)::int AS model_pick,
             random() AS status_pick
      FROM generate_series($1::bigint, $2::bigint) AS g) AS r
CROSS JOIN LATERAL (
    SELECT * FROM (VALUES
        ('openai',    'gpt-4o',              2.50::numeric, 10.00::numeric, 30),
        ('openai',    'gpt-4o-mini',         0.15,           0.60,          55),
        ('groq',      'llama-3.3-70b',       0.59,           0.79,          75),
        ('groq',      'llama-3.1-8b',        0.05,           0.08,          85),
        ('groq',      'experimental-model',  NULL,           NULL,          87),
        ('anthropic', 'claude-sonnet-4',     3.00,          15.00,          95),
        ('anthropic', 'claude-haiku',        0.80,           4.00,         101)
    ) AS v (provider, model, in_price, out_price, upto)
    WHERE r.model_pick < v.upto ORDER BY v.upto LIMIT 1
) AS m
CROSS JOIN LATERAL (
    SELECT CASE WHEN r.status_pick < 0.930 THEN 'success'
                WHEN r.status_pick < 0.960 THEN 'rate_limit'
                WHEN r.status_pick < 0.980 THEN 'error'
                WHEN r.status_pick < 0.990 THEN 'timeout'
                WHEN r.status_pick < 0.995 THEN 'auth_error'
                ELSE 'cancelled' END AS status
) AS s
CROSS JOIN LATERAL (
    SELECT CASE WHEN s.status = 'success' THEN 50 + (random() * 4000)::int END AS input_tokens,
           CASE WHEN s.status = 'success' THEN 10 + (random() * 1000)::int END AS output_tokens
) AS tok
"""


def tenant_uuid_sql(k: int) -> str:
    return f"md5('bench-tenant-{k}')::uuid"
