from __future__ import annotations

import asyncpg

from llm_gateway.migrate import apply_migrations, load_migrations
from tests.conftest import ADMIN_DSN, _drop, _dsn_for


async def test_migrations_are_recorded_and_not_reapplied(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    versions = [m.version for m in load_migrations()]
    rows = await pg.fetch("SELECT version FROM llm_gateway_migrations ORDER BY version")
    assert [r["version"] for r in rows] == versions
    assert await apply_migrations(pg_dsn) == []


async def test_adopts_an_existing_tenants_table() -> None:
    name = "llmgw_test_adopt_" + __import__("uuid").uuid4().hex[:8]
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    try:
        conn = await asyncpg.connect(_dsn_for(name))
        await conn.execute("CREATE TABLE tenants (id uuid PRIMARY KEY, name text, plan text)")
        await conn.execute(
            "INSERT INTO tenants VALUES ('00000000-0000-0000-0000-000000000001', 'acme', 'pro')"
        )
        await apply_migrations(_dsn_for(name))
        row = await conn.fetchrow("SELECT * FROM tenants")
        assert row is not None
        assert row["plan"] == "pro"
        assert row["llm_tokens"] == "{}" and row["inference_config"] == "{}"
        await conn.close()
    finally:
        await _drop(name)
