-- 004: the per-deployment secret of API-key fingerprints.
-- Fingerprints (health(), explain(), logs, usage rows) are HMAC-SHA256 of a key under this
-- secret, so a fingerprint cannot be checked against a guessed key without it. The first router
-- to start generates it when LLM_GATEWAY_FINGERPRINT_KEY is not set. Grant this table only to
-- the roles that may read tenants.llm_tokens.

CREATE TABLE IF NOT EXISTS llm_gateway_secrets (
    name       text PRIMARY KEY,
    value      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE llm_gateway_secrets IS
    'llm-gateway deployment secrets (fingerprint_key: HMAC key of API-key fingerprints).';
