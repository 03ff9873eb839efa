"""Shared fixtures: a throw-away PostgreSQL database per test session, with migrations applied.

PostgreSQL is found through ``TEST_DATABASE_URL`` (default: the local server, trust auth). When
any selected test needs it (uses ``pg_dsn``/``pg`` or the module imports ``ADMIN_DSN``), the server
is probed once after collection; if it cannot be reached the run stops with one line saying where
it looked and what to set, instead of one connection traceback per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from llm_gateway.migrate import apply_migrations
from llm_gateway.simulator import SimulatedProvider

ADMIN_DSN = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# Bounds the probe: a firewalled host would otherwise hang for asyncpg's 60 s default.
PROBE_TIMEOUT = 10.0


def _redacted(dsn: str) -> str:
    """The DSN without its password, for messages."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


async def _probe() -> None:
    conn = await asyncpg.connect(ADMIN_DSN, timeout=PROBE_TIMEOUT)
    await conn.close()


def _needs_postgres(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    return "pg_dsn" in getattr(item, "fixturenames", ()) or hasattr(module, "ADMIN_DSN")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Stop the run with one line if the selected tests need a PostgreSQL that is not there."""
    if session.config.option.collectonly or not any(map(_needs_postgres, session.items)):
        return
    try:
        asyncio.run(_probe())
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        pytest.exit(
            f"cannot connect to PostgreSQL at {_redacted(ADMIN_DSN)} ({reason}). Start it there,"
            " or set TEST_DATABASE_URL to a server where this user may CREATE DATABASE.",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def _dsn_for(database: str) -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


async def _create(name: str, *, migrated: bool = True) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    if migrated:
        await apply_migrations(_dsn_for(name))


async def _drop(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.contextmanager
def scratch_database(label: str, *, migrated: bool = True) -> Iterator[str]:
    """The DSN of a new database (migrated, or empty), dropped afterwards. For the session's
    database, and for tests whose answers depend on every row of a table or that apply the
    migrations themselves."""
    name = f"llmgw_{label}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_create(name, migrated=migrated))
    try:
        yield _dsn_for(name)
    finally:
        asyncio.run(_drop(name))


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of a fresh, migrated database that lives for the test session."""
    with scratch_database("test") as dsn:
        yield dsn


@pytest.fixture
async def two_sims() -> AsyncIterator[tuple[SimulatedProvider, SimulatedProvider]]:
    """Simulated providers "a" (Groq's API) and "b" (OpenAI's): see tests/two_providers.py."""
    a = SimulatedProvider(name="a", flavor="groq")
    b = SimulatedProvider(name="b")
    async with a, b:
        yield a, b


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
