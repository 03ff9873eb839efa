-- 007: tenant-scoped reads with row-level security.
--
-- Members of the NOLOGIN role llm_gateway_tenant_reader read model_usage_stats,
-- model_usage_hourly, usage_spend_counters and budget_events, and see only the rows of the
-- tenant named by the setting llm_gateway.tenant_id (set per transaction:
-- `async with usage.tenant_scope(conn, tenant_id)`, or
-- SELECT set_config('llm_gateway.tenant_id', '<uuid>', true)). With the setting absent, empty
-- or not a UUID they see no rows, and no error. They get SELECT on those tables only: never
-- tenants (keys), llm_gateway_secrets, the all-tenant model_usage_daily_totals or the quota
-- tables.
--
-- Every other role reads and writes as before: each table gets a permissive policy "true" for
-- PUBLIC (without one, enabling RLS would hide every row from every non-owner role, such as a
-- monitoring role), and the tenant condition is a RESTRICTIVE policy for
-- llm_gateway_tenant_reader and the roles that inherit from it. Row security is enabled, not
-- forced: the table owner (the role that runs the router and these migrations), superusers and
-- BYPASSRLS roles are not subject to it.
--
-- The role is cluster-wide. It is created here if absent, which needs CREATEROLE; without it
-- this migration warns and does the rest, and a role that may create roles runs
--     CREATE ROLE llm_gateway_tenant_reader NOLOGIN;
-- then the table owner runs  SELECT llm_gateway_grant_tenant_reader();
-- (the maintenance run adds the policies by itself too, but only that function grants).

-- The tenant of the current transaction, or NULL when the setting is absent, empty or not a
-- UUID in its canonical form (what tenant_scope sends). Checked before the cast, so garbage
-- from the application never raises and never matches. Policies call it as a scalar subquery,
-- so it runs once per query and the tenant_id indexes are used. Its search_path is fixed, so
-- a reader's own search_path cannot swap the operator or the type it uses.
CREATE OR REPLACE FUNCTION llm_gateway_scoped_tenant() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog AS $$
    SELECT CASE WHEN s ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
                THEN s::uuid END
    FROM (SELECT current_setting('llm_gateway.tenant_id', true) AS s) setting
$$;

-- Creates a NOLOGIN role unless it exists. Returns whether it exists afterwards. Safe when the
-- migrations of two databases of one cluster create it at once (the second waits for the
-- first, then finds it). Without CREATEROLE: a WARNING and false, not an error.
CREATE OR REPLACE FUNCTION llm_gateway_create_role_if_absent(role_name text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) THEN
        RETURN true;
    END IF;
    BEGIN
        EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
    EXCEPTION
        WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created meanwhile by another session
        WHEN insufficient_privilege THEN
            RAISE WARNING 'role % not created: % may not create roles (run CREATE ROLE % NOLOGIN '
                          'as a role that may, then SELECT llm_gateway_grant_tenant_reader())',
                          role_name, current_user, role_name;
            RETURN false;
    END;
    RETURN true;
END $$;

-- Enables row security on one table holding a tenant_id, with the two policies (the
-- restrictive one only once the reader role exists). Does nothing when already done, so it is
-- cheap to call on every maintenance run.
CREATE OR REPLACE FUNCTION llm_gateway_scope_table(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT (SELECT relrowsecurity FROM pg_class WHERE oid = tbl) THEN
        EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', tbl);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policy
                   WHERE polrelid = tbl AND polname = 'llm_gateway_unscoped') THEN
        EXECUTE format('CREATE POLICY llm_gateway_unscoped ON %s AS PERMISSIVE FOR ALL '
                       'TO PUBLIC USING (true) WITH CHECK (true)', tbl);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'llm_gateway_tenant_reader')
       AND NOT EXISTS (SELECT 1 FROM pg_policy
                       WHERE polrelid = tbl AND polname = 'llm_gateway_tenant_scope') THEN
        EXECUTE format('CREATE POLICY llm_gateway_tenant_scope ON %s AS RESTRICTIVE FOR ALL '
                       'TO llm_gateway_tenant_reader '
                       'USING (tenant_id = (SELECT llm_gateway_scoped_tenant()))', tbl);
    END IF;
END $$;

-- The tenant tables and every partition of model_usage_stats. Querying the parent applies the
-- parent's policies only; the partitions get them too in case one is ever granted directly
-- (GRANT SELECT ON ALL TABLES ...). Called by llm_gateway_ensure_usage_partitions below.
CREATE OR REPLACE FUNCTION llm_gateway_scope_tenant_tables() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t regclass;
BEGIN
    FOREACH t IN ARRAY ARRAY['model_usage_stats', 'model_usage_hourly', 'usage_spend_counters',
                             'budget_events']::regclass[] LOOP
        PERFORM llm_gateway_scope_table(t);
    END LOOP;
    FOR t IN SELECT p.partition FROM llm_gateway_usage_partitions() p LOOP
        PERFORM llm_gateway_scope_table(t);
    END LOOP;
END $$;

-- Policies plus the grants of llm_gateway_tenant_reader: SELECT on the four tables (the
-- partitioned parent only, never its partitions) and USAGE on their schema. Returns false,
-- with a WARNING, when the role does not exist. Run by the table owner; safe to repeat.
CREATE OR REPLACE FUNCTION llm_gateway_grant_tenant_reader() RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    ns regnamespace := (SELECT relnamespace FROM pg_class
                        WHERE oid = 'model_usage_stats'::regclass);
BEGIN
    PERFORM llm_gateway_scope_tenant_tables();
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'llm_gateway_tenant_reader') THEN
        RAISE WARNING 'role llm_gateway_tenant_reader does not exist: nothing granted';
        RETURN false;
    END IF;
    GRANT SELECT ON model_usage_stats, model_usage_hourly, usage_spend_counters, budget_events
        TO llm_gateway_tenant_reader;
    -- PUBLIC has it by default; explicit, in case the database revokes function rights from
    -- PUBLIC (the reader's queries would fail, never leak, without it).
    GRANT EXECUTE ON FUNCTION llm_gateway_scoped_tenant() TO llm_gateway_tenant_reader;
    IF NOT has_schema_privilege('llm_gateway_tenant_reader', ns, 'USAGE') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %s TO llm_gateway_tenant_reader', ns);
    END IF;
    RETURN true;
END $$;

-- llm_gateway_ensure_usage_partitions as in 002, plus the last PERFORM: monthly partitions
-- made by maintenance get row security and the policies when they are made.
CREATE OR REPLACE FUNCTION llm_gateway_ensure_usage_partitions(
    months_ahead integer DEFAULT 3,
    months_back  integer DEFAULT 1
) RETURNS TABLE (partition_name text, range_from timestamptz, range_to timestamptz,
                 rows_moved bigint)
LANGUAGE plpgsql AS $$
DECLARE
    parent       regclass := 'model_usage_stats'::regclass;
    dflt         regclass;
    this_month   timestamp := date_trunc('month', now() AT TIME ZONE 'UTC');
    months       timestamp[];
    in_default   timestamp[];
    m            timestamp;
    lo           timestamptz;
    hi           timestamptz;
    cols         text;
    saved_lock_timeout text := current_setting('lock_timeout');
BEGIN
    SELECT NULLIF(partdefid, 0)::regclass INTO dflt
    FROM pg_partitioned_table WHERE partrelid = parent;
    -- Every stored column; the generated total_tokens is recomputed on insert.
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO cols
    FROM pg_attribute
    WHERE attrelid = parent AND attnum > 0 AND NOT attisdropped AND attgenerated = '';

    months := ARRAY(SELECT generate_series(this_month - make_interval(months => months_back),
                                           this_month + make_interval(months => months_ahead),
                                           interval '1 month'));
    IF dflt IS NOT NULL THEN
        EXECUTE format('SELECT array_agg(DISTINCT date_trunc(''month'', "timestamp" AT TIME ZONE '
                       '''UTC'')) FROM %s', dflt)
            INTO in_default;
        months := months || coalesce(in_default, '{}');
    END IF;

    IF saved_lock_timeout = '0' THEN
        PERFORM set_config('lock_timeout', '5s', true);
    END IF;

    FOR m IN SELECT DISTINCT x FROM unnest(months) AS x ORDER BY 1 LOOP
        lo := m AT TIME ZONE 'UTC';
        hi := (m + interval '1 month') AT TIME ZONE 'UTC';
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM llm_gateway_usage_partitions() p
            WHERE NOT p.is_default
              AND (p.range_from IS NULL OR p.range_from < hi)
              AND (p.range_to IS NULL OR p.range_to > lo));

        partition_name := format('model_usage_stats_p%s', to_char(m, 'YYYY_MM'));
        rows_moved := 0;
        EXECUTE format('CREATE TABLE %I (LIKE %s INCLUDING DEFAULTS INCLUDING GENERATED)',
                       partition_name, parent);
        IF dflt IS NOT NULL THEN
            EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', dflt);
            EXECUTE format('WITH moved AS (DELETE FROM %s WHERE "timestamp" >= $1 AND "timestamp" < $2'
                           ' RETURNING %s) INSERT INTO %I (%s) SELECT %s FROM moved',
                           dflt, cols, partition_name, cols, cols)
                USING lo, hi;
            GET DIAGNOSTICS rows_moved = ROW_COUNT;
        END IF;
        EXECUTE format('ALTER TABLE %s ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       parent, partition_name, lo, hi);
        range_from := lo;
        range_to := hi;
        RETURN NEXT;
    END LOOP;

    PERFORM llm_gateway_scope_tenant_tables();
    PERFORM set_config('lock_timeout', saved_lock_timeout, true);
END $$;

DO $$
BEGIN
    PERFORM llm_gateway_create_role_if_absent('llm_gateway_tenant_reader');
    PERFORM llm_gateway_grant_tenant_reader();
END $$;
