-- 001: tenants (adopting an existing table) and the usage ledger.
-- Idempotent: safe to run again, and against a database that already has a tenants table.

CREATE TABLE IF NOT EXISTS tenants (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name             text,
    llm_tokens       jsonb NOT NULL DEFAULT '{}'::jsonb,
    inference_config jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Services already have a tenants table: add what the gateway needs, touch nothing else.
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS name text;
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS llm_tokens jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS inference_config jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now();

-- updated_at follows config edits, so caches elsewhere can tell a row changed.
CREATE OR REPLACE FUNCTION llm_gateway_touch_tenant() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.llm_tokens IS DISTINCT FROM OLD.llm_tokens
       OR NEW.inference_config IS DISTINCT FROM OLD.inference_config THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS llm_gateway_touch_tenant ON tenants;
CREATE TRIGGER llm_gateway_touch_tenant BEFORE UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION llm_gateway_touch_tenant();

-- One row per attempt that reached a provider. No foreign key to tenants: a usage row must
-- never be refused (deleted tenant, replay from the spool), and FK checks cost insert speed.
-- No CHECK on status for the same reason. The id is made by the SDK before queueing, so
-- replays are idempotent on (id, timestamp).
CREATE TABLE IF NOT EXISTS model_usage_stats (
    id                 uuid NOT NULL,
    tenant_id          uuid NOT NULL,
    user_id            text,
    provider           text NOT NULL,
    model_name         text NOT NULL,
    endpoint           text,
    input_tokens       integer,
    output_tokens      integer,
    total_tokens       integer GENERATED ALWAYS AS (input_tokens + output_tokens) STORED,
    latency_ms         integer NOT NULL,
    estimated_cost_usd numeric(14, 6),
    status             text NOT NULL,
    error_message      text,
    metadata           jsonb,
    "timestamp"        timestamptz NOT NULL DEFAULT now(),
    request_id         uuid,
    requested_model    text,
    attempt            smallint NOT NULL DEFAULT 1,
    key_source         text,
    input_price_per_m  numeric(12, 6),
    output_price_per_m numeric(12, 6),
    price_known        boolean NOT NULL DEFAULT false,
    PRIMARY KEY (id, "timestamp")
) PARTITION BY RANGE ("timestamp");

-- Catches rows outside every range partition, so no insert is ever refused.
CREATE TABLE IF NOT EXISTS model_usage_stats_default
    PARTITION OF model_usage_stats DEFAULT;

-- Per-tenant time-window queries (usage by tenant, daily cost, rate-limit status).
CREATE INDEX IF NOT EXISTS model_usage_stats_tenant_time
    ON model_usage_stats (tenant_id, "timestamp")
    INCLUDE (provider, model_name, status, total_tokens, estimated_cost_usd, latency_ms);
-- Error analysis reads only non-success rows.
CREATE INDEX IF NOT EXISTS model_usage_stats_errors
    ON model_usage_stats (tenant_id, "timestamp") WHERE status <> 'success';
-- All-tenant scans by time.
CREATE INDEX IF NOT EXISTS model_usage_stats_time_brin
    ON model_usage_stats USING brin ("timestamp");
