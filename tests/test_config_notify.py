"""Tenant config edits reach every router through NOTIFY (migration 006): plain SQL edits,
bulk edits, a lost listening connection, several processes, and the audit trail."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from llm_gateway import TenantLLMRouter, TenantNotFoundError
from llm_gateway.config_listener import DRAIN_SLICE, ConfigListener, parse_notice
from tests.conftest import make_tenant
from tests.tcp_proxy import TcpProxy

WAIT = 15.0  # wide: the machine is loaded; the bench measures the real figures
_SET_CONFIG = "UPDATE tenants SET inference_config = $2::jsonb WHERE id = $1"


def _models(n: int) -> dict[str, Any]:
    return {"preferred_provider": "groq", "preferred_models": {"groq": f"model-{n}"}}


def _router(dsn: str, **kwargs: Any) -> TenantLLMRouter:
    # cache_ttl of an hour: only a notice can make the router see an edit within the test.
    return TenantLLMRouter(dsn, providers={}, record_usage=False, cache_ttl=3600, **kwargs)


async def _model(router: TenantLLMRouter, tenant: uuid.UUID) -> str | None:
    return (await router.tenant_config(tenant)).inference.preferred_models.get("groq")


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def router(pg_dsn: str) -> AsyncIterator[TenantLLMRouter]:
    async with _router(pg_dsn) as r:
        yield r


async def test_a_plain_sql_edit_reaches_the_cache_without_invalidate(
    router: TenantLLMRouter, pg: asyncpg.Connection
) -> None:
    tenant = await make_tenant(pg, inference_config=_models(1))
    assert await _model(router, tenant) == "model-1"
    await pg.execute(_SET_CONFIG, tenant, json.dumps(_models(2)))

    async def seen() -> bool:
        return await _model(router, tenant) == "model-2"

    await _until(seen, "the edited config served")
    listener = router.status()["config_listener"]
    assert listener["state"] == "listening"
    assert listener["notices"] >= 1


async def test_a_deleted_tenant_is_refused_without_invalidate(
    router: TenantLLMRouter, pg: asyncpg.Connection
) -> None:
    tenant = await make_tenant(pg, inference_config=_models(1))
    assert await _model(router, tenant) == "model-1"
    await pg.execute("DELETE FROM tenants WHERE id = $1", tenant)

    async def refused() -> bool:
        try:
            await router.tenant_config(tenant)
        except TenantNotFoundError:
            return True
        return False

    await _until(refused, "the deleted tenant refused")


async def _barrier(router: TenantLLMRouter, pg: asyncpg.Connection) -> None:
    """Until every notice committed before this call was handled (they arrive in order)."""
    marker = await make_tenant(pg, inference_config=_models(1))
    assert await _model(router, marker) == "model-1"
    await pg.execute(_SET_CONFIG, marker, json.dumps(_models(2)))

    async def seen() -> bool:
        return await _model(router, marker) == "model-2"

    await _until(seen, "the barrier's edit served")


async def test_an_edit_of_other_columns_keeps_the_cached_config(
    router: TenantLLMRouter, pg: asyncpg.Connection
) -> None:
    tenant = await make_tenant(pg, inference_config=_models(1))
    assert await _model(router, tenant) == "model-1"
    await _barrier(router, pg)
    assert await _model(router, tenant) == "model-1"  # cached after its insert's notice
    cached = router._store._cache[tenant]
    await pg.execute("UPDATE tenants SET name = 'renamed' WHERE id = $1", tenant)
    # Same config written again: not a change either.
    await pg.execute(_SET_CONFIG, tenant, json.dumps(_models(1)))
    await _barrier(router, pg)  # every notice of the two edits, if any, has been handled
    # The very same cached object: the tenant's config was never dropped and reloaded.
    assert router._store._cache.get(tenant) is cached


async def test_a_bulk_edit_of_10000_tenants_is_coalesced(
    router: TenantLLMRouter, pg: asyncpg.Connection
) -> None:
    tag = f"bulk-{uuid.uuid4().hex[:8]}"
    ids: list[uuid.UUID] = await pg.fetchval(
        "WITH t AS (INSERT INTO tenants (name, inference_config)"
        " SELECT $1, $2::jsonb FROM generate_series(1, 10000) RETURNING id)"
        " SELECT array_agg(id) FROM t",
        tag,
        json.dumps(_models(1)),
    )
    try:
        watched = ids[::500]  # 20 tenants cached by this router
        for tenant in watched:
            assert await _model(router, tenant) == "model-1"
        await _barrier(router, pg)
        before = router.status()["config_listener"]
        async with pg.transaction():
            await pg.execute(
                "UPDATE tenants SET inference_config = $2::jsonb WHERE name = $1",
                tag,
                json.dumps(_models(2)),
            )
            await pg.execute(
                'UPDATE tenants SET llm_tokens = \'{"groq": "k"}\' WHERE name = $1', tag
            )

        async def all_seen() -> bool:
            models = [await _model(router, t) for t in watched]
            return models == ["model-2"] * len(watched)

        await _until(all_seen, "every watched tenant's new config served")
        after = router.status()["config_listener"]
        # Two statements of 10,000 rows: up to 2 x 50 notices of 200 ids, not 20,000 notices
        # (PostgreSQL drops a notice identical to one the transaction already sent).
        assert 50 <= after["notices"] - before["notices"] <= 100
        assert 10_000 <= after["tenant_ids"] - before["tenant_ids"] <= 20_000
        assert (
            await pg.fetchval(
                "SELECT count(*) FROM tenant_config_history WHERE tenant_id = ANY($1)", ids
            )
            == 3 * 10_000
        )  # insert, config edit, token edit
    finally:
        await pg.execute("DELETE FROM tenants WHERE name = $1", tag)


async def test_a_transaction_past_1000_notices_sends_one_all_notice_instead(
    router: TenantLLMRouter, pg: asyncpg.Connection
) -> None:
    tag = f"rows-{uuid.uuid4().hex[:8]}"
    ids: list[uuid.UUID] = await pg.fetchval(
        "WITH t AS (INSERT INTO tenants (name, inference_config)"
        " SELECT $1, $2::jsonb FROM generate_series(1, 1100) RETURNING id)"
        " SELECT array_agg(id) FROM t",
        tag,
        json.dumps(_models(1)),
    )
    try:
        await _barrier(router, pg)
        last = ids[-1]  # edited after the 1,000th notice: only '*' announces it
        assert await _model(router, last) == "model-1"
        before = router.status()["config_listener"]
        async with pg.transaction():
            await pg.executemany(  # one statement, hence one notice, per tenant
                _SET_CONFIG, [(t, json.dumps(_models(2))) for t in ids]
            )

        async def seen() -> bool:
            return await _model(router, last) == "model-2"

        await _until(seen, "the last tenant's edit served")
        after = router.status()["config_listener"]
        assert after["notices"] - before["notices"] == 1001  # 1,000 ids, then one '*'
        assert after["resets"] - before["resets"] == 1
    finally:
        await pg.execute("DELETE FROM tenants WHERE name = $1", tag)


async def test_a_lost_listening_connection_reconnects_and_drops_every_cached_config(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    tenant = await make_tenant(pg, inference_config=_models(1))
    async with TcpProxy(pg_dsn) as proxy, _router(proxy.dsn) as router:
        assert await _model(router, tenant) == "model-1"
        assert router.status()["config_listener"]["connects"] == 1
        await proxy.cut()

        async def down() -> bool:
            return router.status()["config_listener"]["state"] == "reconnecting"

        await _until(down, "the listener notices the lost connection")
        await pg.execute(_SET_CONFIG, tenant, json.dumps(_models(2)))  # its notice is missed
        # Meanwhile the cached config is served (the TTL bounds its age).
        assert await _model(router, tenant) == "model-1"
        proxy.restore()

        async def back() -> bool:
            status = router.status()["config_listener"]
            return bool(status["state"] == "listening" and status["connects"] == 2)

        await _until(back, "the listener reconnected (backoff at most 5 s)")
        assert router.status()["config_listener"]["resets"] == 2
        assert await _model(router, tenant) == "model-2"


async def test_an_all_notice_drops_every_cached_config(
    router: TenantLLMRouter, pg: asyncpg.Connection
) -> None:
    tenant = await make_tenant(pg, inference_config=_models(1))
    await _barrier(router, pg)  # the insert's notice is behind us
    assert await _model(router, tenant) == "model-1"
    # An edit without its notice (trigger off for this transaction), then a '*' notice.
    async with pg.transaction():
        await pg.execute("SET LOCAL session_replication_role = replica")
        await pg.execute(_SET_CONFIG, tenant, json.dumps(_models(2)))
    assert await _model(router, tenant) == "model-1"
    await pg.execute("NOTIFY llm_gateway_tenant_config, '*'")

    async def seen() -> bool:
        return await _model(router, tenant) == "model-2"

    await _until(seen, "every config dropped by '*'")


async def test_10000_notices_are_handled_in_slices_not_in_one_loop_iteration(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    """One UPDATE statement per tenant in one transaction: 10,000 one-id notices, which
    asyncpg hands over in one loop iteration; the listener spreads the work over several."""
    loop = asyncio.get_running_loop()
    iteration = 0
    ticking = True

    def tick() -> None:
        nonlocal iteration
        iteration += 1
        if ticking:
            loop.call_soon(tick)

    per_iteration: dict[int, int] = {}
    all_handled = asyncio.Event()

    def on_ids(ids: Any) -> None:
        per_iteration[iteration] = per_iteration.get(iteration, 0) + len(list(ids))
        if sum(per_iteration.values()) >= 10_000:
            all_handled.set()

    listener = ConfigListener(pg_dsn, on_ids, lambda: None)
    listener.start()
    try:
        assert await listener.wait_first_attempt(10)
        ids = [str(uuid.uuid4()) for _ in range(10_000)]
        async with pg.transaction():
            await pg.executemany(
                "SELECT pg_notify('llm_gateway_tenant_config', $1)", [(i,) for i in ids]
            )
            tick()
        await asyncio.wait_for(all_handled.wait(), WAIT)
    finally:
        ticking = False
        await listener.close()
    assert sum(per_iteration.values()) == len(ids)
    assert max(per_iteration.values()) <= DRAIN_SLICE + 200
    assert len(per_iteration) >= len(ids) // (DRAIN_SLICE + 200)


async def test_reconnect_backoff_doubles_up_to_5_seconds() -> None:
    """Against a port that refuses connections: waits of 0.1 s doubling, never above 5 s."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    waits: list[float] = []
    enough = asyncio.Event()

    async def sleep(delay: float) -> None:
        waits.append(delay)
        if len(waits) >= 10:
            enough.set()
        await asyncio.sleep(0)

    listener = ConfigListener(
        f"postgresql://postgres:pw-not-logged@127.0.0.1:{port}/x", lambda ids: None,
        lambda: None, sleep=sleep,
    )  # fmt: skip
    listener.start()
    try:
        await asyncio.wait_for(enough.wait(), WAIT)
        status = listener.status()
    finally:
        await listener.close()
    assert waits[:10] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0]
    assert status["state"] == "reconnecting" and status["connects"] == 0
    assert status["last_error"] is not None and "pw-not-logged" not in str(status)
    assert listener.status()["state"] == "closed"


def test_parse_notice_skips_malformed_ids() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    assert parse_notice(f"{a},nonsense,{b}") == [a, b]
    assert parse_notice("*") is None


async def test_history_names_token_providers_never_their_values(
    pg: asyncpg.Connection,
) -> None:
    secret = "sk-history-secret-value"
    tenant = await make_tenant(
        pg, llm_tokens={"groq": secret, "openai": secret}, inference_config=_models(1)
    )
    await pg.execute(
        "UPDATE tenants SET llm_tokens = $2::jsonb, inference_config = $3::jsonb WHERE id = $1",
        tenant,
        json.dumps({"groq": secret + "2", "llm7": secret}),
        json.dumps(_models(2)),
    )
    await pg.execute("UPDATE tenants SET name = 'only the name' WHERE id = $1", tenant)
    await pg.execute("DELETE FROM tenants WHERE id = $1", tenant)
    rows = await pg.fetch(
        "SELECT changed_by, old_config::text, new_config::text, token_changes::text,"
        " changed_by = current_user AS by_me, row_to_json(h)::text AS whole"
        " FROM tenant_config_history h WHERE tenant_id = $1 ORDER BY id",
        tenant,
    )
    assert len(rows) == 3  # insert, edit, delete; the rename is not a config change
    assert all(r["by_me"] for r in rows)
    changes = [json.loads(r["token_changes"]) for r in rows]
    assert changes == [
        {"added": ["groq", "openai"], "removed": [], "changed": []},
        {"added": ["llm7"], "removed": ["openai"], "changed": ["groq"]},
        {"added": [], "removed": ["groq", "llm7"], "changed": []},
    ]
    configs = [(r["old_config"], r["new_config"]) for r in rows]
    assert configs[0][0] is None and json.loads(configs[0][1]) == _models(1)
    assert json.loads(configs[1][0]) == _models(1) and json.loads(configs[1][1]) == _models(2)
    assert json.loads(configs[2][0]) == _models(2) and configs[2][1] is None
    assert not any(secret in r["whole"] for r in rows)


# --- several processes ------------------------------------------------------------------------


async def _process(dsn: str, tenant: str, ready: Any, results: Any) -> None:
    tid = uuid.UUID(tenant)
    async with _router(dsn) as router:
        assert await _model(router, tid) == "model-1"
        ready.put(True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if await _model(router, tid) == "model-2":
                results.put(time.monotonic())  # CLOCK_MONOTONIC: one clock for the machine
                return
            await asyncio.sleep(0.01)
        results.put(None)


def _process_main(dsn: str, tenant: str, ready: Any, results: Any) -> None:
    asyncio.run(_process(dsn, tenant, ready, results))


async def test_an_edit_reaches_routers_in_other_processes(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    tenant = await make_tenant(pg, inference_config=_models(1))
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=_process_main, args=(pg_dsn, str(tenant), ready, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    try:
        loop = asyncio.get_running_loop()
        for _ in procs:
            assert await loop.run_in_executor(None, ready.get, True, 60)
        committed = time.monotonic()
        await pg.execute(_SET_CONFIG, tenant, json.dumps(_models(2)))
        seen = [await loop.run_in_executor(None, results.get, True, 70) for _ in procs]
        assert None not in seen, "a process never saw the edit"
        assert all(t - committed < 5 for t in seen), [t - committed for t in seen]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
