"""README promises of the tenant config cache and of database errors."""

from __future__ import annotations

import socket
import uuid

import asyncpg
import pytest

from llm_gateway import (
    DatabaseError,
    TenantLLMRouter,
    TenantNotFoundError,
    apply_migrations,
    provider_settings,
)
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import _create, _drop, _dsn_for, make_tenant

MSG = [{"role": "user", "content": "hi"}]


async def test_a_tenant_created_after_a_miss_is_seen_on_its_next_request(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    tenant = uuid.uuid4()
    async with SimulatedProvider(name="g") as g:
        providers = {"groq": provider_settings("groq", g.root_url, api_key="sys-g")}
        async with TenantLLMRouter(pg_dsn, providers=providers, record_usage=False) as router:
            with pytest.raises(TenantNotFoundError):
                await router.complete_for_tenant(tenant, MSG)
            await pg.execute(
                "INSERT INTO tenants (id, name, llm_tokens, inference_config)"
                " VALUES ($1, 'late', '{}', '{}')",
                tenant,
            )
            # No invalidate_cache(): a miss is not cached.
            assert (await router.complete_for_tenant(tenant, MSG)).provider == "groq"


async def test_last_known_config_survives_invalidate_cache_during_an_outage() -> None:
    """invalidate_cache() drops the cached config, not the outage fallback."""
    name = f"llmgw_test_inval_{uuid.uuid4().hex[:8]}"
    await _create(name)
    dsn = _dsn_for(name)
    async with SimulatedProvider(name="g") as g:
        providers = {"groq": provider_settings("groq", g.root_url, api_key="sys-g")}
        router = TenantLLMRouter(dsn, providers=providers, record_usage=False)
        try:
            conn = await asyncpg.connect(dsn)
            t = await make_tenant(conn, inference_config={"preferred_provider": "groq"})
            await conn.close()
            assert (await router.complete_for_tenant(t, MSG)).provider == "groq"
            await _drop(name)  # the config database is gone
            router.invalidate_cache(t)
            assert (await router.complete_for_tenant(t, MSG)).provider == "groq"
            router.invalidate_cache()
            assert (await router.complete_for_tenant(t, MSG)).provider == "groq"
        finally:
            await router.close()
            await _drop(name)


def _unused_port_dsn() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"postgresql://postgres:s3cret-pw@127.0.0.1:{port}/nowhere"


async def test_unreachable_database_errors_carry_no_password() -> None:
    dsn = _unused_port_dsn()
    with pytest.raises(DatabaseError) as router_error:
        await TenantLLMRouter(dsn, providers={}, record_usage=False).start()
    with pytest.raises(DatabaseError) as migrate_error:
        await apply_migrations(dsn)
    for info in (router_error, migrate_error):
        text = f"{info.value} {info.value!r} {info.value.__cause__}"
        assert "s3cret-pw" not in text
        assert "Connect call failed" in str(info.value)  # the cause, password masked
