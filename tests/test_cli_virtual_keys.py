"""``llm-gateway keys create|list|revoke``, run as real processes against the test database."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from llm_gateway.errors import VirtualKeyError
from llm_gateway.server.virtual_keys import VirtualKeyStore
from tests.conftest import make_tenant
from tests.test_cli import ENV, ROOT, TIMEOUT, _command, assert_one_line_error
from tests.test_virtual_keys import eventually


def keys(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_command(), "keys", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**ENV, "DATABASE_URL": dsn},
        timeout=TIMEOUT,
    )


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    try:
        yield p
    finally:
        await p.close()


async def test_key_lifecycle_across_processes(
    pg_dsn: str, pool: asyncpg.Pool, pg: asyncpg.Connection
) -> None:
    tenant = await make_tenant(pg)
    made = keys(pg_dsn, "create", "--tenant", str(tenant), "--name", "billing", "--format", "json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    raw, key_id = created["key"], created["id"]
    async with VirtualKeyStore(pool, cache_ttl=3600) as store:
        key = await store.authenticate(raw)  # the key works, and is now cached in this process
        assert str(key.id) == key_id and key.name == "billing" and key.tenant_id == tenant

        for fmt in ("table", "json"):
            listed = keys(pg_dsn, "list", "--tenant", str(tenant), "--format", fmt)
            assert listed.returncode == 0, listed.stderr
            assert key_id in listed.stdout and raw[:10] in listed.stdout
            assert raw[10:] not in listed.stdout  # never the key
        rows = json.loads(keys(pg_dsn, "list", "--tenant", str(tenant), "--format", "json").stdout)
        assert [r["id"] for r in rows] == [key_id] and rows[0]["revoked_at"] is None

        revoked = keys(pg_dsn, "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr

        async def refused() -> bool:
            try:
                await store.authenticate(raw)
            except VirtualKeyError as exc:
                return exc.reason == "revoked"
            return False

        # Revoked by another process: refused here by the notice (an hour of cache TTL).
        await eventually(refused)


async def test_create_with_limits_models_and_expiry(pg_dsn: str, pg: asyncpg.Connection) -> None:
    tenant = await make_tenant(pg)
    made = keys(
        pg_dsn,
        "create",
        "--tenant",
        str(tenant),
        "--user",
        "alice",
        "--models",
        "m1, m2",
        "--max-usd",
        "5",
        "--period",
        "1d",
        "--rpm",
        "10",
        "--expires",
        "2099-01-31",
    )
    assert made.returncode == 0, made.stderr
    raw = next(line[5:] for line in made.stdout.splitlines() if line.startswith("key: "))
    assert made.stdout.count(raw) == 1 and "shown once" in made.stdout
    row = await pg.fetchrow(
        "SELECT user_id, models, limits::text, expires_at FROM virtual_keys WHERE tenant_id = $1",
        tenant,
    )
    assert row is not None
    assert row["user_id"] == "alice" and row["models"] == ["m1", "m2"]
    assert json.loads(row["limits"]) == {
        "max_usd": 5.0,
        "period": "1d",
        "requests_per_minute": 10,
    }
    assert row["expires_at"] == datetime(2099, 1, 31, tzinfo=UTC)


@pytest.mark.parametrize(
    "args",
    [
        ["--models", ""],
        ["--period", "1d"],  # a period without a budget
        ["--expires", "2001-01-01"],  # in the past
        ["--user", ""],
    ],
)
async def test_invalid_create_is_a_usage_error(
    pg_dsn: str, pg: asyncpg.Connection, args: list[str]
) -> None:
    tenant = await make_tenant(pg)
    proc = keys(pg_dsn, "create", "--tenant", str(tenant), *args)
    assert_one_line_error(proc, 2)
    assert "lgw-" not in proc.stdout + proc.stderr
    assert await pg.fetchval("SELECT count(*) FROM virtual_keys WHERE tenant_id = $1", tenant) == 0


async def test_create_for_unknown_tenant(pg_dsn: str) -> None:
    proc = keys(pg_dsn, "create", "--tenant", str(uuid.uuid4()))
    assert_one_line_error(proc, 1)
    assert "unknown tenant" in proc.stderr


@pytest.mark.parametrize("key_id", [str(uuid.uuid4()), "not-an-id"])
def test_revoke_unknown_id_fails(pg_dsn: str, key_id: str) -> None:
    proc = keys(pg_dsn, "revoke", key_id)
    assert_one_line_error(proc, 1)
    assert "no virtual key" in proc.stderr
