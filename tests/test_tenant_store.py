"""The tenant config store against real PostgreSQL: shared loads, cancellation, invalidation,
bounded waits, and deployment-wide key fingerprints."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from llm_gateway import ConfigUnavailableError, GatewayError, TenantLLMRouter
from llm_gateway.config import TenantConfig
from llm_gateway.migrate import apply_migrations
from llm_gateway.tenant_store import TenantConfigStore
from tests.conftest import ADMIN_DSN, _drop, _dsn_for, make_tenant

GROQ = {"preferred_provider": "groq"}
LLM7 = {"preferred_provider": "llm7"}
_UPDATE = "UPDATE tenants SET inference_config = $2::jsonb WHERE id = $1"


def _store(pool: asyncpg.Pool, **kwargs: Any) -> TenantConfigStore[TenantConfig]:
    return TenantConfigStore(lambda: pool, lambda config: config, **kwargs)


async def _wait_until_blocked(conn: asyncpg.Connection, waiting: int = 1) -> None:
    """Until ``waiting`` config queries wait on a lock in PostgreSQL."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%FROM tenants WHERE id%'"
        )
        if count >= waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the config query never blocked on the lock")


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


async def test_cancelling_the_loading_caller_does_not_cancel_the_other_waiters(
    pg_dsn: str, pg: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    tid = await make_tenant(pg, inference_config=GROQ)
    store = _store(pool, query_timeout=60)
    locker = await asyncpg.connect(pg_dsn)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
        loader = asyncio.create_task(store.get(tid))
        await _wait_until_blocked(pg)
        waiter = asyncio.create_task(store.get(tid))
        await asyncio.sleep(0.05)  # the waiter joins the load
        loader.cancel()
        await asyncio.sleep(0.05)
        await tx.rollback()
        config = await asyncio.wait_for(waiter, 30)
        assert config.inference.preferred_provider == "groq"
        with pytest.raises(asyncio.CancelledError):
            await loader
        assert store.loads == 1
        # The load finished for the waiter, so it was cached: no second query.
        assert (await store.get(tid)).inference.preferred_provider == "groq"
        assert store.loads == 1
    finally:
        await locker.close()


class _LateRows(asyncpg.Connection):
    """A connection whose rows arrive late (a slow network): the query reads the database at
    once, and the result is handed over only when ``release`` is set. A held table lock cannot
    stage this: PostgreSQL takes a blocked statement's snapshot after the lock wait, so a
    blocked load would read the new row anyway."""

    read = asyncio.Event()
    release = asyncio.Event()
    delay = False

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        row = await super().fetchrow(query, *args, **kwargs)
        if _LateRows.delay and "FROM tenants" in query:
            _LateRows.read.set()
            await _LateRows.release.wait()
        return row


async def test_a_request_after_invalidation_does_not_join_an_older_load(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    tid = await make_tenant(pg, inference_config=GROQ)
    _LateRows.read, _LateRows.release, _LateRows.delay = asyncio.Event(), asyncio.Event(), True
    late = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2, connection_class=_LateRows)
    try:
        store = _store(late, query_timeout=60)
        before = asyncio.create_task(store.get(tid))
        await asyncio.wait_for(_LateRows.read.wait(), 20)  # it read the old row
        await pg.execute(_UPDATE, tid, '{"preferred_provider": "llm7"}')
        store.invalidate(tid)
        _LateRows.delay = False
        after = asyncio.create_task(store.get(tid))
        config = await asyncio.wait_for(after, 20)
        assert config.inference.preferred_provider == "llm7"
        _LateRows.release.set()
        # The request that began before the invalidation gets what it read; it is not cached.
        assert (await before).inference.preferred_provider == "groq"
        assert (await store.get(tid)).inference.preferred_provider == "llm7"
    finally:
        _LateRows.delay = False
        _LateRows.release.set()
        await late.close()


async def test_invalidating_everything_also_detaches_in_flight_loads(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    tid = await make_tenant(pg, inference_config=GROQ)
    _LateRows.read, _LateRows.release, _LateRows.delay = asyncio.Event(), asyncio.Event(), True
    late = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2, connection_class=_LateRows)
    try:
        store = _store(late, query_timeout=60)
        before = asyncio.create_task(store.get(tid))
        await asyncio.wait_for(_LateRows.read.wait(), 20)
        await pg.execute(_UPDATE, tid, '{"preferred_provider": "llm7"}')
        store.invalidate()
        _LateRows.delay = False
        config = await asyncio.wait_for(store.get(tid), 20)
        assert config.inference.preferred_provider == "llm7"
        _LateRows.release.set()
        await before
    finally:
        _LateRows.delay = False
        _LateRows.release.set()
        await late.close()


async def test_config_load_is_bounded_when_every_pooled_connection_is_busy(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    tid = await make_tenant(pg, inference_config=GROQ)
    other = await make_tenant(pg, inference_config=LLM7)
    small = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        store = _store(small, query_timeout=1.0, retry_after_error=0.0)
        assert (await store.get(other)).inference.preferred_provider == "llm7"
        store.invalidate(other)
        async with small.acquire():  # the only connection is busy elsewhere
            t0 = time.monotonic()
            with pytest.raises(ConfigUnavailableError, match="TimeoutError"):
                await asyncio.wait_for(store.get(tid), 30)
            # A tenant loaded before is served its last known config instead.
            stale = await asyncio.wait_for(store.get(other), 30)
            elapsed = time.monotonic() - t0
        assert stale.inference.preferred_provider == "llm7"
        assert elapsed < 10
        assert (await store.get(tid)).inference.preferred_provider == "groq"
    finally:
        await small.close()


# --- key fingerprints ---------------------------------------------------------------------


@pytest.fixture
async def other_deployment() -> AsyncIterator[str]:
    """A second migrated database: another deployment."""
    name = f"llmgw_test_fp_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        await apply_migrations(_dsn_for(name))
        yield _dsn_for(name)
    finally:
        await _drop(name)


def _router(dsn: str, **kwargs: Any) -> TenantLLMRouter:
    return TenantLLMRouter(dsn, providers={}, record_usage=False, **kwargs)


async def test_fingerprints_are_keyed_per_deployment(
    pg_dsn: str, other_deployment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLM_GATEWAY_FINGERPRINT_KEY", raising=False)
    secret = "gsk_a-guessable-key"
    # Two first starts of a new deployment at once agree on one generated secret.
    far, far_too = _router(other_deployment), _router(other_deployment)
    await asyncio.gather(far.start(), far_too.start())
    try:
        async with _router(pg_dsn) as one, _router(pg_dsn) as two:
            fingerprint = one.key_fingerprint(secret)
            assert fingerprint != hashlib.sha256(secret.encode()).hexdigest()[:12]
            assert len(fingerprint) == 12
            assert two.key_fingerprint(secret) == fingerprint  # same deployment, same print
            assert one.key_fingerprint("another key") != fingerprint
        assert far.key_fingerprint(secret) == far_too.key_fingerprint(secret) != fingerprint
    finally:
        await far.close()
        await far_too.close()


async def test_fingerprint_key_from_argument_or_environment(
    pg_dsn: str, other_deployment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_GATEWAY_FINGERPRINT_KEY", "from-the-environment")
    async with _router(pg_dsn) as one, _router(other_deployment) as far:
        assert one.key_fingerprint("k") == far.key_fingerprint("k")
        from_env = one.key_fingerprint("k")
    async with _router(pg_dsn, fingerprint_key="from-an-argument") as given:
        assert given.key_fingerprint("k") != from_env


async def test_no_fingerprint_before_the_deployment_key_is_known(pg_dsn: str) -> None:
    router = _router(pg_dsn)
    with pytest.raises(GatewayError, match="not started"):
        router.key_fingerprint("k")
    await router.close()
