-- 006: config edits reach every router at once, and leave an audit trail.
--
-- Statement-level triggers (with transition tables) on tenants: every statement that inserts,
-- deletes, or changes llm_tokens / inference_config of some rows
--   * appends one tenant_config_history row per changed tenant, and
--   * sends NOTIFY llm_gateway_tenant_config with the changed ids, comma-separated, up to 200
--     ids per notice (a payload is at most 8000 bytes): a bulk edit of 10,000 tenants is 50
--     notices, not 10,000. PostgreSQL delivers them at COMMIT, and never for a rollback.
-- TRUNCATE, and a transaction past 1,000 notices, send '*' (every tenant). Routers LISTEN and drop those tenants' cached configs.
-- Edits of other columns (name, updated_at...) send nothing and record nothing.

-- What changed, for people asking why routing changed. Token *values* (plaintext or
-- encrypted) are never copied here: token_changes lists provider names only.
CREATE TABLE IF NOT EXISTS tenant_config_history (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id     uuid        NOT NULL,
    changed_at    timestamptz NOT NULL DEFAULT now(),
    changed_by    text        NOT NULL DEFAULT current_user,
    old_config    jsonb,       -- inference_config before (NULL: the tenant was inserted)
    new_config    jsonb,       -- inference_config after (NULL: the tenant was deleted)
    token_changes jsonb       NOT NULL  -- {"added": [...], "removed": [...], "changed": [...]}
);
CREATE INDEX IF NOT EXISTS tenant_config_history_tenant
    ON tenant_config_history (tenant_id, changed_at);

-- Provider names added, removed and changed between two llm_tokens documents. A document
-- that is not an object (a malformed row) counts as empty: recording must never refuse an edit.
CREATE OR REPLACE FUNCTION llm_gateway_token_changes(old_tokens jsonb, new_tokens jsonb)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    WITH o AS (SELECT CASE WHEN jsonb_typeof(old_tokens) = 'object' THEN old_tokens
                           ELSE '{}'::jsonb END AS d),
         n AS (SELECT CASE WHEN jsonb_typeof(new_tokens) = 'object' THEN new_tokens
                           ELSE '{}'::jsonb END AS d),
         k AS (SELECT key FROM o, jsonb_object_keys(o.d) AS key
               UNION SELECT key FROM n, jsonb_object_keys(n.d) AS key)
    SELECT jsonb_build_object(
        'added', coalesce(jsonb_agg(k.key ORDER BY k.key)
                 FILTER (WHERE NOT o.d ? k.key), '[]'::jsonb),
        'removed', coalesce(jsonb_agg(k.key ORDER BY k.key)
                 FILTER (WHERE NOT n.d ? k.key), '[]'::jsonb),
        'changed', coalesce(jsonb_agg(k.key ORDER BY k.key)
                 FILTER (WHERE o.d ? k.key AND n.d ? k.key AND o.d -> k.key <> n.d -> k.key),
                 '[]'::jsonb))
      FROM o, n LEFT JOIN k ON true
$$;

-- Records and announces one statement's changed tenants (arrays aligned by position).
-- SECURITY INVOKER (the default), so changed_by is the role that made the edit: a role that
-- edits tenants needs INSERT on tenant_config_history.
-- Past 1,000 notices in one transaction (e.g. 10,000 one-row UPDATE statements: one notice
-- each), the rest of the transaction sends one '*' instead: each notice costs every router a
-- callback in asyncpg, all run in one event-loop iteration (bench/README.md), while '*' costs
-- a reload of the tenants actually in use. The count lives in a transaction-local setting.
CREATE OR REPLACE FUNCTION llm_gateway_tenant_changes(
    ids uuid[], old_tokens jsonb[], new_tokens jsonb[], old_configs jsonb[], new_configs jsonb[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    max_notices CONSTANT int := 1000;
    sent int := coalesce(nullif(current_setting('llm_gateway.tenant_notices', true), ''),
                         '0')::int;
    chunks int;
BEGIN
    IF coalesce(cardinality(ids), 0) = 0 THEN
        RETURN;
    END IF;
    INSERT INTO tenant_config_history (tenant_id, old_config, new_config, token_changes)
    SELECT c.id, c.old_config, c.new_config, llm_gateway_token_changes(c.old_tok, c.new_tok)
      FROM unnest(ids, old_tokens, new_tokens, old_configs, new_configs)
           AS c (id, old_tok, new_tok, old_config, new_config);
    IF sent > max_notices THEN
        RETURN;  -- '*' is already on its way
    END IF;
    chunks := (cardinality(ids) + 199) / 200;
    IF sent + chunks > max_notices THEN
        PERFORM pg_notify('llm_gateway_tenant_config', '*');
        PERFORM set_config('llm_gateway.tenant_notices', (max_notices + 1)::text, true);
        RETURN;
    END IF;
    -- 200 ids (7,400 bytes) per notice, under the 8,000-byte payload limit.
    PERFORM pg_notify('llm_gateway_tenant_config', string_agg(d.id::text, ','))
      FROM (SELECT id, (row_number() OVER () - 1) / 200 AS chunk
              FROM (SELECT DISTINCT unnest(ids) AS id) u) d
     GROUP BY d.chunk;
    PERFORM set_config('llm_gateway.tenant_notices', (sent + chunks)::text, true);
END
$$;

CREATE OR REPLACE FUNCTION llm_gateway_tenants_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM llm_gateway_tenant_changes(array_agg(n.id), array_agg(NULL::jsonb),
                                       array_agg(n.llm_tokens), array_agg(NULL::jsonb),
                                       array_agg(n.inference_config))
       FROM new_rows n;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION llm_gateway_tenants_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM llm_gateway_tenant_changes(array_agg(o.id), array_agg(o.llm_tokens),
                                       array_agg(NULL::jsonb), array_agg(o.inference_config),
                                       array_agg(NULL::jsonb))
       FROM old_rows o;
    RETURN NULL;
END
$$;

-- A full join on id also covers an UPDATE that changes a tenant's id (seen as a delete of
-- the old id and an insert of the new one). Rows whose tokens and config are unchanged are
-- left out: a statement trigger cannot take a column list when it has transition tables.
CREATE OR REPLACE FUNCTION llm_gateway_tenants_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM llm_gateway_tenant_changes(array_agg(coalesce(n.id, o.id)), array_agg(o.llm_tokens),
                                       array_agg(n.llm_tokens), array_agg(o.inference_config),
                                       array_agg(n.inference_config))
       FROM old_rows o FULL JOIN new_rows n ON n.id = o.id
      WHERE o.id IS NULL OR n.id IS NULL
         OR o.llm_tokens IS DISTINCT FROM n.llm_tokens
         OR o.inference_config IS DISTINCT FROM n.inference_config;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION llm_gateway_tenants_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('llm_gateway_tenant_config', '*');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS llm_gateway_tenants_inserted ON tenants;
CREATE TRIGGER llm_gateway_tenants_inserted AFTER INSERT ON tenants
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION llm_gateway_tenants_inserted();
DROP TRIGGER IF EXISTS llm_gateway_tenants_deleted ON tenants;
CREATE TRIGGER llm_gateway_tenants_deleted AFTER DELETE ON tenants
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION llm_gateway_tenants_deleted();
DROP TRIGGER IF EXISTS llm_gateway_tenants_updated ON tenants;
CREATE TRIGGER llm_gateway_tenants_updated AFTER UPDATE ON tenants
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION llm_gateway_tenants_updated();
DROP TRIGGER IF EXISTS llm_gateway_tenants_truncated ON tenants;
CREATE TRIGGER llm_gateway_tenants_truncated AFTER TRUNCATE ON tenants
    FOR EACH STATEMENT EXECUTE FUNCTION llm_gateway_tenants_truncated();
