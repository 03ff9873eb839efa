"""Shared fixtures: a throw-away PostgreSQL database per test session, with migrations applied.

PostgreSQL is found through ``TEST_DATABASE_URL`` (default: the local server, trust auth).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from llm_gateway.migrate import apply_migrations

ADMIN_DSN = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _dsn_for(database: str) -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


async def _create(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    await apply_migrations(_dsn_for(name))


async def _drop(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of a fresh, migrated database that lives for the test session."""
    name = f"llmgw_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_create(name))
    try:
        yield _dsn_for(name)
    finally:
        asyncio.run(_drop(name))


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the session database, for arranging and checking rows."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def make_tenant(
    conn: asyncpg.Connection,
    *,
    llm_tokens: object = None,
    inference_config: object = None,
    name: str = "t",
) -> uuid.UUID:
    """Insert a tenant row; JSON values are passed as text so malformed shapes can be stored."""
    import json

    tid = uuid.uuid4()
    await conn.execute(
        "INSERT INTO tenants (id, name, llm_tokens, inference_config)"
        " VALUES ($1, $2, $3::jsonb, $4::jsonb)",
        tid,
        name,
        json.dumps(llm_tokens if llm_tokens is not None else {}),
        json.dumps(inference_config if inference_config is not None else {}),
    )
    return tid
