-- Spend of a tenant by tag and UTC day over the last 30 days (index-only scan of
-- model_usage_stats_tagged_time). A row with two tags counts in both.
-- One tag only: add  AND tags @> ARRAY['<tag>']  (index model_usage_stats_tags).
--
--   psql "$DATABASE_URL" -v tenant_id=<tenant uuid> -f sql/monitoring/tag_spend_daily.sql
SELECT ("timestamp" AT TIME ZONE 'UTC')::date AS day_utc,
       tag,
       COUNT(*) AS requests,
       SUM(estimated_cost_usd) AS cost_usd
FROM model_usage_stats
CROSS JOIN LATERAL unnest(tags) AS tag
WHERE tenant_id = :'tenant_id'
  AND tags IS NOT NULL
  AND "timestamp" >= ((NOW() AT TIME ZONE 'UTC')::date - 29)::timestamp AT TIME ZONE 'UTC'
GROUP BY day_utc, tag
ORDER BY day_utc, cost_usd DESC NULLS LAST, tag;
