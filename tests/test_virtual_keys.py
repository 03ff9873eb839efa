"""Virtual keys: creation, keyed hashing, cached authentication, and revocation everywhere."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from llm_gateway.errors import TenantNotFoundError, VirtualKeyError, VirtualKeySpecError
from llm_gateway.server.virtual_keys import VirtualKey, VirtualKeyStore
from tests.conftest import make_tenant

WAIT = 15.0  # seconds a notice may take to arrive on a loaded machine (typically milliseconds)


class Clock:
    """A monotonic clock and a UTC wall clock that tests move by hand."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.wall = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

    def mono(self) -> float:
        return self.t

    def now(self) -> datetime:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.wall += timedelta(seconds=seconds)


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def tenant(pg: asyncpg.Connection) -> uuid.UUID:
    return await make_tenant(pg)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = WAIT) -> None:
    """Wait until ``check()`` holds (a wide bound: it returns as soon as it does)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def refused(store: VirtualKeyStore, raw: str) -> str | None:
    try:
        await store.authenticate(raw)
    except VirtualKeyError as exc:
        return exc.reason
    return None


async def test_only_a_keyed_hash_is_stored(
    pool: asyncpg.Pool, pg: asyncpg.Connection, tenant: uuid.UUID
) -> None:
    async with VirtualKeyStore(pool, notify=False) as store:
        raw, key = await store.create(tenant, user_id="alice", name="ci")
    assert re.fullmatch(r"lgw-[A-Za-z0-9_-]{43}", raw)
    assert key.prefix == raw[:10] and key.tenant_id == tenant and key.user_id == "alice"
    row = await pg.fetchrow("SELECT * FROM virtual_keys WHERE id = $1", key.id)
    assert row is not None
    assert raw[10:] not in repr(dict(row))  # the secret part of the key is stored nowhere
    secret = await pg.fetchval(
        "SELECT value FROM llm_gateway_secrets WHERE name = 'fingerprint_key'"
    )
    subkey = hmac.new(secret.encode(), b"virtual-keys", hashlib.sha256).digest()
    assert row["key_hash"] == hmac.new(subkey, raw.encode(), hashlib.sha256).digest()
    assert row["key_hash"] != hashlib.sha256(raw.encode()).digest()  # not an unkeyed hash


async def test_authenticate_serves_from_memory_until_the_ttl(
    pool: asyncpg.Pool, pg: asyncpg.Connection, tenant: uuid.UUID
) -> None:
    clock = Clock()
    store = VirtualKeyStore(pool, notify=False, cache_ttl=60, clock=clock.mono, now=clock.now)
    await store.start()
    raw, key = await store.create(tenant, models=["m1"])
    assert await store.authenticate(raw) == key
    # Deleted behind the store's back (it does not listen): the cached record still answers,
    # so the cached path asks nothing of PostgreSQL...
    await pg.execute("DELETE FROM virtual_keys WHERE id = $1", key.id)
    assert await store.authenticate(raw) == key
    clock.advance(61)  # ...until the TTL, the bound on staleness without notices
    assert await refused(store, raw) == "unknown"
    await store.close()


async def test_revocation_by_another_store_is_refused_on_the_next_request(
    pg_dsn: str, pool: asyncpg.Pool, tenant: uuid.UUID
) -> None:
    other_pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        # An hour of TTL: only the notice can make store B refuse the key.
        async with (
            VirtualKeyStore(pool, cache_ttl=3600) as a,
            VirtualKeyStore(other_pool, cache_ttl=3600) as b,
        ):
            assert a.listening and b.listening
            raw, key = await a.create(tenant)
            assert (await b.authenticate(raw)).id == key.id
            assert await a.revoke(key.id) is True
            assert await refused(a, raw) == "revoked"  # at once in the revoking store
            await eventually(lambda: _is(refused(b, raw), "revoked"))
            assert b.notices >= 1
    finally:
        await other_pool.close()


async def _is(value: Awaitable[Any], expected: object) -> bool:
    return (await value) == expected


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE virtual_keys SET expires_at = now() - interval '1 s' WHERE id = $1",
        "DELETE FROM virtual_keys WHERE id = $1",
        "DELETE FROM tenants WHERE id = (SELECT tenant_id FROM virtual_keys WHERE id = $1)",
    ],
)
async def test_edits_by_sql_reach_the_cache(
    pool: asyncpg.Pool, pg: asyncpg.Connection, tenant: uuid.UUID, edit: str
) -> None:
    async with VirtualKeyStore(pool, cache_ttl=3600) as store:
        raw, key = await store.create(tenant)
        await store.authenticate(raw)
        await pg.execute(edit, key.id)
        await eventually(
            lambda: _is(refused(store, raw), "expired" if "expires" in edit else "unknown")
        )


async def test_last_used_at_alone_evicts_nothing(
    pool: asyncpg.Pool, pg: asyncpg.Connection, tenant: uuid.UUID
) -> None:
    async with VirtualKeyStore(pool, cache_ttl=3600) as store:
        raw, key = await store.create(tenant)
        await store.authenticate(raw)
        notices = store.notices
        await pg.execute("UPDATE virtual_keys SET last_used_at = now() WHERE id = $1", key.id)
        await pg.execute("UPDATE virtual_keys SET name = 'renamed' WHERE id = $1", key.id)
        await eventually(lambda: _true(store.notices > notices))
        # The notice is handled in a later loop turn than it arrives (the listener drains
        # notices in slices): the rename shows once it is.
        await eventually(lambda: _is(_name(store, raw), "renamed"))
        assert store.notices == notices + 1  # the rename only


async def _name(store: VirtualKeyStore, raw: str) -> str | None:
    return (await store.authenticate(raw)).name


async def _true(value: bool) -> bool:
    return value


async def test_listener_reconnects_after_its_connection_is_killed(
    pool: asyncpg.Pool, pg: asyncpg.Connection, tenant: uuid.UUID
) -> None:
    async with VirtualKeyStore(pool, cache_ttl=3600) as store:
        raw, key = await store.create(tenant)
        await store.authenticate(raw)
        killed = await pg.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%virtual_keys%'"
        )
        assert killed == 1
        await eventually(lambda: _true(not store.listening))
        await eventually(lambda: _true(store.listening))
        await store.authenticate(raw)  # cached again: only a notice can make it refused
        await pg.execute("UPDATE virtual_keys SET revoked_at = now() WHERE id = $1", key.id)
        await eventually(lambda: _is(refused(store, raw), "revoked"))


async def test_an_expired_key_is_refused_on_the_cached_path(
    pool: asyncpg.Pool, tenant: uuid.UUID
) -> None:
    clock = Clock()
    clock.wall = datetime.now(UTC)
    async with VirtualKeyStore(pool, notify=False, clock=clock.mono, now=clock.now) as store:
        raw, key = await store.create(tenant, expires_at=clock.wall + timedelta(hours=1))
        assert await store.authenticate(raw) == key
        clock.advance(2 * 3600)
        with pytest.raises(VirtualKeyError) as caught:
            await store.authenticate(raw)
    assert caught.value.reason == "expired" and caught.value.key_id == str(key.id)
    assert raw not in str(caught.value) and raw not in repr(caught.value)


@pytest.mark.parametrize(
    "bad", ["", "sk-123", "lgw-short", "lgw-" + "a" * 44, "lgw-" + "a" * 42 + "!"]
)
async def test_malformed_keys_are_refused_without_a_query(pool: asyncpg.Pool, bad: str) -> None:
    store = VirtualKeyStore(pool, notify=False)
    await store.start()
    with pytest.raises(VirtualKeyError) as caught:
        await store.authenticate(bad)
    assert caught.value.reason == "malformed"


async def test_unknown_key(pool: asyncpg.Pool) -> None:
    async with VirtualKeyStore(pool, notify=False) as store:
        assert await refused(store, "lgw-" + "A" * 43) == "unknown"
        assert await refused(store, "lgw-" + "A" * 43) == "unknown"  # remembered, same answer


async def test_concurrent_misses_load_once(
    pool: asyncpg.Pool, pg: asyncpg.Connection, tenant: uuid.UUID
) -> None:
    async with VirtualKeyStore(pool, notify=False) as store:
        raw, key = await store.create(tenant)
        got = await asyncio.gather(*(store.authenticate(raw) for _ in range(20)))
    assert {k.id for k in got} == {key.id}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"user_id": ""}, "user_id"),
        ({"user_id": "u" * 257}, "user_id"),
        ({"name": "a\nb"}, "name"),
        ({"models": "gpt-4o"}, "models"),
        ({"models": []}, "models"),
        ({"models": ["ok", ""]}, "models"),
        ({"models": ["a b"]}, "models"),
        ({"limits": {"rpm": 5}}, "limits"),
        ({"limits": {"requests_per_minute": 0}}, "limits.requests_per_minute"),
        ({"limits": {"requests_per_minute": "5"}}, "limits.requests_per_minute"),
        ({"limits": {"max_usd": -1}}, "limits.max_usd"),
        ({"limits": {"max_usd": True}}, "limits.max_usd"),
        ({"limits": {"max_usd": 5, "period": "2w"}}, "limits.period"),
        ({"limits": {"period": "1d"}}, "limits"),
        ({"limits": {"anchor": "2026-01-01"}}, "limits"),
        ({"limits": {"max_usd": 1, "period": "7d", "anchor": "soon"}}, "limits.anchor"),
        ({"limits": {"max_usd": 5, "alert_at": [0.5, 2]}}, "limits.alert_at"),
        ({"expires_at": datetime(2030, 1, 1)}, "expires_at"),
        ({"expires_at": datetime(2000, 1, 1, tzinfo=UTC)}, "expires_at"),
    ],
)
async def test_invalid_specs_are_refused_clearly(
    pool: asyncpg.Pool,
    pg: asyncpg.Connection,
    tenant: uuid.UUID,
    kwargs: dict[str, Any],
    field: str,
) -> None:
    store = VirtualKeyStore(pool, notify=False)
    with pytest.raises(VirtualKeySpecError) as caught:
        await store.create(tenant, **kwargs)
    assert caught.value.field == field
    assert await pg.fetchval("SELECT count(*) FROM virtual_keys WHERE tenant_id = $1", tenant) == 0


async def test_limits_are_stored_in_the_governance_shape(
    pool: asyncpg.Pool, tenant: uuid.UUID
) -> None:
    async with VirtualKeyStore(pool, notify=False) as store:
        raw, key = await store.create(
            tenant,
            models=["m1", "m2", "m1"],
            limits={"max_usd": 5, "requests_per_minute": 10, "alert_at": [1, 0.5]},
        )
        loaded = await store.authenticate(raw)
    expected = {"max_usd": 5.0, "period": "1mo", "requests_per_minute": 10, "alert_at": [0.5, 1.0]}
    assert dict(key.limits or {}) == expected and dict(loaded.limits or {}) == expected
    assert loaded.models == ("m1", "m2")


async def test_anchor_of_rolling_periods(pool: asyncpg.Pool, tenant: uuid.UUID) -> None:
    async with VirtualKeyStore(pool, notify=False) as store:
        raw, _ = await store.create(
            tenant, limits={"max_usd": 1, "period": "7d", "anchor": "2026-01-05"}
        )
        loaded = await store.authenticate(raw)
    assert dict(loaded.limits or {}) == {"max_usd": 1.0, "period": "7d", "anchor": "2026-01-05"}


async def test_unknown_tenant(pool: asyncpg.Pool) -> None:
    store = VirtualKeyStore(pool, notify=False)
    with pytest.raises(TenantNotFoundError):
        await store.create(uuid.uuid4())
    with pytest.raises(TenantNotFoundError):
        await store.create("not-a-uuid")


async def test_list_and_revoke(
    pool: asyncpg.Pool, pg: asyncpg.Connection, tenant: uuid.UUID
) -> None:
    other = await make_tenant(pg)
    async with VirtualKeyStore(pool, notify=False) as store:
        _, k1 = await store.create(tenant, name="one")
        _, k2 = await store.create(tenant, name="two")
        _, k3 = await store.create(other)
        assert [k.id for k in await store.list(tenant)] == [k1.id, k2.id]
        assert {k1.id, k2.id, k3.id} <= {k.id for k in await store.list()}
        assert await store.revoke(str(k1.id)) is True
        first = (await store.list(tenant))[0].revoked_at
        assert first is not None
        assert await store.revoke(k1.id) is True  # idempotent, keeps the first time
        assert (await store.list(tenant))[0].revoked_at == first
        assert await store.revoke(uuid.uuid4()) is False
        assert await store.revoke("nonsense") is False


def test_allows_model() -> None:
    now = datetime.now(UTC)
    base: dict[str, Any] = {
        "id": uuid.uuid4(),
        "tenant_id": uuid.uuid4(),
        "user_id": None,
        "name": None,
        "prefix": "lgw-abcdef",
        "limits": None,
        "expires_at": None,
        "revoked_at": None,
        "created_at": now,
    }
    store = VirtualKeyStore.__new__(VirtualKeyStore)
    anything = VirtualKey(models=None, **base)
    some = VirtualKey(models=("m1", "fast"), **base)
    assert store.allows_model(anything, "x") and store.allows_model(anything, None)
    assert store.allows_model(some, "fast") and not store.allows_model(some, "m2")
    assert not store.allows_model(some, None)


async def test_reprs_hold_no_secret(
    pool: asyncpg.Pool, pg: asyncpg.Connection, tenant: uuid.UUID
) -> None:
    async with VirtualKeyStore(pool, notify=False) as store:
        raw, key = await store.create(tenant)
        await store.authenticate(raw)
        digest = await pg.fetchval("SELECT key_hash FROM virtual_keys WHERE id = $1", key.id)
        texts = [repr(key), str(key), repr(store), repr(key.as_dict())]
    for text in texts:
        assert raw[10:] not in text and digest.hex() not in text and repr(digest) not in text
