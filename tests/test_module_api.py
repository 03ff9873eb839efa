"""The process-wide router: ``get_tenant_router``, ``complete_for_tenant``, ``close_tenant_router``.

Configured only through the environment (``DATABASE_URL`` and the provider variables),
pointed at the test database and at simulated providers over loopback HTTP.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from llm_gateway import (
    close_tenant_router,
    complete_for_tenant,
    get_tenant_router,
    stream_for_tenant,
)
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import make_tenant

MSG = [{"role": "user", "content": "hello"}]
PROVIDER_ENV = [
    f"{p}_{v}"
    for p in ("GROQ", "OPENROUTER", "LLM7", "OPENAI", "LOCAL_LLM")
    for v in ("API_KEY", "BASE_URL")
] + ["LOCAL_LLM_MODEL"]


@pytest.fixture
async def env(
    monkeypatch: pytest.MonkeyPatch, pg_dsn: str, tmp_path: Path
) -> AsyncIterator[tuple[SimulatedProvider, SimulatedProvider]]:
    """groq and llm7 simulators with system keys, named only by environment variables."""
    for name in PROVIDER_ENV:
        monkeypatch.delenv(name, raising=False)
    async with SimulatedProvider(name="groq") as groq, SimulatedProvider(name="llm7") as llm7:
        monkeypatch.setenv("DATABASE_URL", pg_dsn)
        monkeypatch.setenv("LLM_GATEWAY_SPOOL_DIR", str(tmp_path / "spool"))
        monkeypatch.setenv("GROQ_BASE_URL", groq.root_url)
        monkeypatch.setenv("GROQ_API_KEY", "gsk-system-env")
        monkeypatch.setenv("LLM7_BASE_URL", llm7.base_url + "/")  # a trailing slash is fine
        monkeypatch.setenv("LLM7_API_KEY", "llm7-system-env")
        try:
            yield groq, llm7
        finally:
            await close_tenant_router()


async def rows(pg: asyncpg.Connection, tenant: uuid.UUID) -> list[asyncpg.Record]:
    return await pg.fetch(
        "SELECT request_id, attempt, provider, status, endpoint, user_id, key_source"
        " FROM model_usage_stats WHERE tenant_id = $1",
        tenant,
    )


async def test_module_functions_route_and_close_drains_rows(
    env: tuple[SimulatedProvider, SimulatedProvider], pg: asyncpg.Connection, pg_dsn: str
) -> None:
    groq, llm7 = env
    tenant = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
    routers = await asyncio.gather(*(get_tenant_router() for _ in range(5)))
    assert all(r is routers[0] for r in routers)  # concurrent first calls share one router
    router = routers[0]
    assert router.dsn == pg_dsn  # from DATABASE_URL

    result = await complete_for_tenant(
        tenant_id=tenant, messages=MSG, endpoint="/api/module", user_id="u-1"
    )
    assert (result.provider, result.key_source, result.content) == (
        "groq",
        "system",
        "[groq] hello",
    )
    groq.fail_with = "503"  # fails over to llm7, the other provider named by the environment
    failed_over = await complete_for_tenant(str(tenant), MSG, endpoint="/api/module")
    assert [a.provider for a in failed_over.attempts] == ["groq", "llm7"]
    groq.fail_with = None
    async with await stream_for_tenant(tenant, MSG, endpoint="/api/module") as stream:
        text = "".join([c.content async for c in stream])
    assert text == "[groq] hello"
    assert groq.keys_seen() == ["gsk-system-env"] * 3
    assert llm7.keys_seen() == ["llm7-system-env"]

    await close_tenant_router()  # drains: every row is in PostgreSQL once it returns
    written = await rows(pg, tenant)
    by_request = {(r["request_id"], r["attempt"]): (r["provider"], r["status"]) for r in written}
    assert len(written) == 4
    assert by_request[(result.request_id, 1)] == ("groq", "success")
    assert by_request[(failed_over.request_id, 1)] == ("groq", "error")
    assert by_request[(failed_over.request_id, 2)] == ("llm7", "success")
    assert sorted(by_request.values()).count(("groq", "success")) == 2  # the stream's row
    assert {r["endpoint"] for r in written} == {"/api/module"}
    assert [r["user_id"] for r in written if r["request_id"] == result.request_id] == ["u-1"]
    assert {r["key_source"] for r in written} == {"system"}

    # A later call makes a new router (the closed one is not reused).
    again = await get_tenant_router()
    assert again is not router
    assert (await complete_for_tenant(tenant, MSG)).provider == "groq"


class SimThread:
    """A simulator serving from its own thread and event loop, so it outlives ``asyncio.run``."""

    def __init__(self, name: str) -> None:
        self.sim = SimulatedProvider(name=name)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> SimulatedProvider:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.sim.start(), self.loop).result(timeout=30)
        return self.sim

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.sim.close(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


def test_each_event_loop_gets_its_own_router(
    monkeypatch: pytest.MonkeyPatch, pg_dsn: str, tmp_path: Path
) -> None:
    """A script that runs ``asyncio.run`` twice: the second loop must not reuse the first
    loop's router (its pool and HTTP clients belong to a closed loop) nor its lock."""
    for name in PROVIDER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", pg_dsn)
    monkeypatch.setenv("LLM_GATEWAY_SPOOL_DIR", str(tmp_path / "spool"))

    async def make_tenant_row() -> uuid.UUID:
        conn = await asyncpg.connect(pg_dsn)
        try:
            return await make_tenant(conn, inference_config={"preferred_provider": "groq"})
        finally:
            await conn.close()

    async def serve(tenant: uuid.UUID, close: bool) -> list[str]:
        # Concurrent first calls, so the module's lock is contended in this loop.
        results = await asyncio.gather(*(complete_for_tenant(tenant, MSG) for _ in range(4)))
        if close:
            await close_tenant_router()
        return [r.provider for r in results]

    async def written(tenant: uuid.UUID) -> int:
        conn = await asyncpg.connect(pg_dsn)
        try:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM model_usage_stats WHERE tenant_id = $1", tenant
            )
            return count
        finally:
            await conn.close()

    with SimThread("groq") as groq:
        monkeypatch.setenv("GROQ_BASE_URL", groq.root_url)
        monkeypatch.setenv("GROQ_API_KEY", "gsk-system-env")
        first, second = asyncio.run(make_tenant_row()), asyncio.run(make_tenant_row())
        assert asyncio.run(serve(first, close=False)) == ["groq"] * 4  # the loop just ends
        assert asyncio.run(serve(second, close=True)) == ["groq"] * 4
        asyncio.run(close_tenant_router())  # nothing left to close: a no-op
        assert len(groq.requests) == 8
    assert asyncio.run(written(second)) == 4  # the second loop's router drained its rows
