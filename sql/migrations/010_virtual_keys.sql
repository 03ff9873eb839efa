-- 010: virtual keys, the credentials of the gateway server's callers.
--
-- A key belongs to a tenant (and optionally one of its users), may be limited to some models
-- and carry its own limits (the shape of the governance user_limits), may expire, and is
-- revoked by setting revoked_at. Only key_hash is stored: HMAC-SHA256 of the key under a
-- sub-key of the deployment secret (llm_gateway_secrets, migration 004), so a dump of this
-- table does not allow guessing keys offline. prefix is the key's first characters, for lists.
--
-- Every process caches keys in memory; each statement that updates or deletes keys sends
-- NOTIFY llm_gateway_virtual_keys with the changed key ids, comma-separated, up to 200 per
-- notice (delivered at COMMIT, never for a rollback), so a revoked key is refused by every
-- process on its next request. Inserts send '+' (a process drops the unknown keys it
-- remembered), TRUNCATE sends '*' (drop everything). Updates that only touch last_used_at
-- send nothing: a process writes it when it loads a key, which must not evict the key
-- everywhere.

CREATE TABLE IF NOT EXISTS virtual_keys (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id      text        CHECK (length(user_id) BETWEEN 1 AND 256),
    name         text        CHECK (length(name) BETWEEN 1 AND 200),
    prefix       text        NOT NULL,
    key_hash     bytea       NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    models       text[]      CHECK (cardinality(models) > 0),  -- NULL: any model of the tenant
    limits       jsonb       CHECK (jsonb_typeof(limits) = 'object'),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz  -- when a process last loaded it (granularity: the cache TTL)
);
CREATE INDEX IF NOT EXISTS virtual_keys_tenant ON virtual_keys (tenant_id, created_at);

COMMENT ON TABLE virtual_keys IS
    'llm-gateway server credentials: keyed hashes of virtual keys, their tenant, models and limits.';

-- Announces changed key ids, 200 per notice (a payload is at most 8000 bytes).
CREATE OR REPLACE FUNCTION llm_gateway_virtual_keys_notify(ids uuid[]) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('llm_gateway_virtual_keys', string_agg(d.id::text, ','))
      FROM (SELECT id, (row_number() OVER () - 1) / 200 AS chunk
              FROM (SELECT DISTINCT unnest(ids) AS id) u) d
     GROUP BY d.chunk
$$;

CREATE OR REPLACE FUNCTION llm_gateway_virtual_keys_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- A full join on id also covers an UPDATE that changes a key's id.
    PERFORM llm_gateway_virtual_keys_notify(array_agg(DISTINCT x.id))
       FROM (SELECT o.id AS old_id, n.id AS new_id
               FROM old_rows o FULL JOIN new_rows n ON n.id = o.id
              WHERE o.id IS NULL OR n.id IS NULL
                 OR (o.tenant_id, o.user_id, o.name, o.prefix, o.key_hash, o.models, o.limits,
                     o.expires_at, o.revoked_at)
                    IS DISTINCT FROM
                    (n.tenant_id, n.user_id, n.name, n.prefix, n.key_hash, n.models, n.limits,
                     n.expires_at, n.revoked_at)) c,
            LATERAL (VALUES (c.old_id), (c.new_id)) x (id)
      WHERE x.id IS NOT NULL
     HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION llm_gateway_virtual_keys_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM llm_gateway_virtual_keys_notify(array_agg(o.id)) FROM old_rows o HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION llm_gateway_virtual_keys_signal() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('llm_gateway_virtual_keys', TG_ARGV[0]);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS llm_gateway_virtual_keys_updated ON virtual_keys;
CREATE TRIGGER llm_gateway_virtual_keys_updated AFTER UPDATE ON virtual_keys
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION llm_gateway_virtual_keys_updated();
DROP TRIGGER IF EXISTS llm_gateway_virtual_keys_deleted ON virtual_keys;
CREATE TRIGGER llm_gateway_virtual_keys_deleted AFTER DELETE ON virtual_keys
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION llm_gateway_virtual_keys_deleted();
DROP TRIGGER IF EXISTS llm_gateway_virtual_keys_inserted ON virtual_keys;
CREATE TRIGGER llm_gateway_virtual_keys_inserted AFTER INSERT ON virtual_keys
    FOR EACH STATEMENT EXECUTE FUNCTION llm_gateway_virtual_keys_signal('+');
DROP TRIGGER IF EXISTS llm_gateway_virtual_keys_truncated ON virtual_keys;
CREATE TRIGGER llm_gateway_virtual_keys_truncated AFTER TRUNCATE ON virtual_keys
    FOR EACH STATEMENT EXECUTE FUNCTION llm_gateway_virtual_keys_signal('*');
