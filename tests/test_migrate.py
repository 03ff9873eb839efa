from __future__ import annotations

import asyncio
import json
import sys
import uuid

import asyncpg
import pytest

from llm_gateway.errors import DatabaseError
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
    name = "llmgw_test_adopt_" + uuid.uuid4().hex[:8]
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


async def test_refuses_a_tenants_table_whose_id_is_not_a_uuid() -> None:
    name = "llmgw_test_adopt_" + __import__("uuid").uuid4().hex[:8]
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    try:
        conn = await asyncpg.connect(_dsn_for(name))
        await conn.execute("CREATE TABLE tenants (id bigint PRIMARY KEY, name text)")
        with pytest.raises(DatabaseError) as info:
            await apply_migrations(_dsn_for(name))
        assert str(info.value) == (
            "cannot adopt the existing tenants table: its id column is bigint, and the gateway"
            " needs uuid (tenant ids are UUIDs); convert the column or use a uuid key"
        )
        # Nothing was changed: the adoption was rolled back, and nothing is recorded.
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'tenants'"
        )
        assert {r["column_name"] for r in columns} == {"id", "name"}
        assert await conn.fetchval("SELECT count(*) FROM llm_gateway_migrations") == 0
        await conn.close()
    finally:
        await _drop(name)


# Imports first, then waits for "go" on stdin, so every process migrates at the same moment.
_MIGRATE_ONCE = """
import asyncio, json, sys
from llm_gateway.migrate import apply_migrations
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps(asyncio.run(apply_migrations(sys.argv[1]))), flush=True)
"""


async def test_concurrent_processes_apply_each_migration_once() -> None:
    """Several instances starting at once on a fresh database: all succeed, one applies."""
    name = "llmgw_test_race_" + uuid.uuid4().hex[:8]
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = _dsn_for(name)
    try:
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _MIGRATE_ONCE,
                dsn,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(4)
        ]
        for proc in procs:
            assert proc.stdout is not None
            assert await proc.stdout.readline() == b"ready\n"
        outputs = await asyncio.gather(*(p.communicate(b"go\n") for p in procs))
        for proc, (_, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, err.decode()
        applied = sorted(json.loads(out) for out, _ in outputs)
        versions = [m.version for m in load_migrations()]
        assert applied == [[], [], [], versions]  # one process applied them, in order
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT version FROM llm_gateway_migrations ORDER BY version")
            assert [r["version"] for r in rows] == versions
            assert await conn.fetchval("SELECT to_regclass('model_usage_stats') IS NOT NULL")
        finally:
            await conn.close()
    finally:
        await _drop(name)
