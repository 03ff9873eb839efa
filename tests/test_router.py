"""The core router end to end: real PostgreSQL, simulated providers over real HTTP."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from llm_gateway import (
    AllProvidersFailedError,
    BadRequestError,
    InvalidRequestError,
    InvalidTenantConfigError,
    NoProviderAvailableError,
    TenantLLMRouter,
    TenantNotFoundError,
    provider_settings,
)
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import make_tenant

MSG = [{"role": "user", "content": "hello"}]


class Sims:
    def __init__(self) -> None:
        self.groq = SimulatedProvider(name="groq")
        self.openrouter = SimulatedProvider(name="openrouter")
        self.llm7 = SimulatedProvider(name="llm7")

    def all(self) -> list[SimulatedProvider]:
        return [self.groq, self.openrouter, self.llm7]

    def providers(self, **system_keys: str | None) -> dict[str, Any]:
        return {
            "groq": provider_settings("groq", self.groq.root_url, api_key=system_keys.get("groq")),
            "openrouter": provider_settings(
                "openrouter", self.openrouter.base_url, api_key=system_keys.get("openrouter")
            ),
            "llm7": provider_settings("llm7", self.llm7.base_url, api_key=system_keys.get("llm7")),
        }


@pytest.fixture
async def sims() -> AsyncIterator[Sims]:
    s = Sims()
    for sim in s.all():
        await sim.start()
    try:
        yield s
    finally:
        for sim in s.all():
            await sim.close()


async def usage_rows(conn: asyncpg.Connection, tenant: uuid.UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM model_usage_stats WHERE tenant_id = $1 ORDER BY request_id, attempt",
        tenant,
    )


async def test_tenant_key_then_system_key(pg_dsn: str, pg: asyncpg.Connection, sims: Sims) -> None:
    own = await make_tenant(
        pg, llm_tokens={"groq": "gsk-tenant-own"}, inference_config={"preferred_provider": "groq"}
    )
    keyless = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
    providers = sims.providers(groq="gsk-system")
    async with TenantLLMRouter(pg_dsn, providers=providers) as router:
        a = await router.complete_for_tenant(own, MSG)
        b = await router.complete_for_tenant(keyless, MSG)
    assert (a.provider, a.key_source) == ("groq", "tenant")
    assert (b.provider, b.key_source) == ("groq", "system")
    assert a.content == "[groq] hello"
    assert sims.groq.keys_seen() == ["gsk-tenant-own", "gsk-system"]
    rows = await usage_rows(pg, own)
    assert [(r["provider"], r["status"], r["key_source"]) for r in rows] == [
        ("groq", "success", "tenant")
    ]
    assert rows[0]["input_tokens"] == a.tokens_input and rows[0]["output_tokens"] == a.tokens_output
    # The served model's price: llama-3.3-70b-versatile at 0.59 / 0.79 per million tokens.
    assert rows[0]["estimated_cost_usd"] == a.cost and a.cost is not None and a.cost > 0
    assert "gsk-tenant-own" not in json.dumps(dict(rows[0]), default=str)


async def test_keys_never_cross_tenants_under_concurrency(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    tenants = {
        await make_tenant(
            pg,
            llm_tokens={"llm7": f"key-of-tenant-{i}"},
            inference_config={"preferred_provider": "llm7"},
        ): f"key-of-tenant-{i}"
        for i in range(20)
    }
    sims.llm7.latency_ms = 5  # keep requests in flight together
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:

        async def ask(tenant: uuid.UUID, n: int) -> tuple[uuid.UUID, str]:
            content = f"tenant {tenant} request {n}"
            result = await router.complete_for_tenant(
                tenant, [{"role": "user", "content": content}]
            )
            assert result.content == f"[llm7] {content}"
            return tenant, content

        done = await asyncio.gather(*(ask(t, n) for t in tenants for n in range(5)))
    assert len(done) == 100
    seen = [(r.api_key, r.body["messages"][-1]["content"]) for r in sims.llm7.requests]
    assert len(seen) == 100
    for key, content in seen:
        tenant = uuid.UUID(content.split()[1])
        assert key == tenants[tenant], f"request of {tenant} carried another tenant's key"


@pytest.mark.parametrize("failure", ["503", "drop", "malformed", "empty", "html", "429"])
async def test_failover_to_next_provider(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims, failure: str
) -> None:
    tenant = await make_tenant(
        pg,
        llm_tokens={"openrouter": "or-key", "groq": "gsk-key"},
        inference_config={"preferred_provider": "openrouter", "fallback_order": ["groq"]},
    )
    sims.openrouter.fail_with = failure
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:
        result = await router.complete_for_tenant(tenant, MSG)
    assert result.provider == "groq"
    assert [a.provider for a in result.attempts] == ["openrouter", "groq"]
    assert result.attempts[0].outcome != "success" and result.attempts[0].error_class
    assert result.attempts[1].outcome == "success"
    rows = await usage_rows(pg, tenant)
    assert [(r["provider"], r["attempt"]) for r in rows] == [("openrouter", 1), ("groq", 2)]
    assert rows[0]["status"] == result.attempts[0].outcome
    assert rows[0]["error_message"] and rows[1]["status"] == "success"
    assert rows[0]["request_id"] == rows[1]["request_id"] == result.request_id


async def test_no_failover_when_disabled(pg_dsn: str, pg: asyncpg.Connection, sims: Sims) -> None:
    tenant = await make_tenant(
        pg,
        llm_tokens={"openrouter": "or-key", "groq": "gsk-key"},
        inference_config={"preferred_provider": "openrouter", "auto_failover": False},
    )
    sims.openrouter.fail_with = "503"
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:
        with pytest.raises(AllProvidersFailedError) as info:
            await router.complete_for_tenant(tenant, MSG)
    assert [a.provider for a in info.value.attempts] == ["openrouter"]
    assert sims.groq.requests == []
    assert len(await usage_rows(pg, tenant)) == 1


async def test_bad_request_is_not_failed_over(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    tenant = await make_tenant(
        pg,
        llm_tokens={"openrouter": "or-key", "groq": "gsk-key"},
        inference_config={"preferred_provider": "openrouter"},
    )
    sims.openrouter.fail_with = "400"
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:
        with pytest.raises(BadRequestError) as info:
            await router.complete_for_tenant(tenant, MSG)
    assert info.value.status_code == 400
    assert [a.provider for a in info.value.attempts] == ["openrouter"]
    assert sims.groq.requests == [] and sims.llm7.requests == []
    rows = await usage_rows(pg, tenant)
    assert [(r["provider"], r["status"]) for r in rows] == [("openrouter", "error")]


async def test_invalidate_cache_and_ttl(pg_dsn: str, pg: asyncpg.Connection, sims: Sims) -> None:
    tenant = await make_tenant(
        pg,
        llm_tokens={"groq": "g", "llm7": "l"},
        inference_config={"preferred_provider": "groq"},
    )

    async def prefer(provider: str) -> None:
        await pg.execute(
            "UPDATE tenants SET inference_config = jsonb_set(inference_config,"
            " '{preferred_provider}', to_jsonb($2::text)) WHERE id = $1",
            tenant,
            provider,
        )

    # Without the NOTIFY listener: this is about invalidate_cache and the TTL alone.
    async with TenantLLMRouter(
        pg_dsn, providers=sims.providers(), cache_ttl=3.0, config_notify=False
    ) as router:
        assert (await router.complete_for_tenant(tenant, MSG)).provider == "groq"
        await prefer("llm7")
        # Cached: the edit is not seen before invalidation or the TTL.
        assert (await router.complete_for_tenant(tenant, MSG)).provider == "groq"
        router.invalidate_cache(tenant)
        assert (await router.complete_for_tenant(tenant, MSG)).provider == "llm7"
        await prefer("groq")
        assert (await router.complete_for_tenant(tenant, MSG)).provider == "llm7"
        await asyncio.sleep(3.2)  # the TTL passes
        assert (await router.complete_for_tenant(tenant, MSG)).provider == "groq"
        await prefer("llm7")
        router.invalidate_cache()  # all tenants
        assert (await router.complete_for_tenant(tenant, MSG)).provider == "llm7"


async def test_concurrent_misses_make_one_query(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    tenant = await make_tenant(pg, llm_tokens={"groq": "g"})
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:
        configs = await asyncio.gather(*(router.tenant_config(tenant) for _ in range(50)))
        assert router._store.loads == 1
    assert all(c is configs[0] for c in configs)


async def test_malformed_config_names_the_field(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    bad_type = await make_tenant(pg, inference_config={"auto_failover": "sometimes"})
    bad_key = await make_tenant(pg, llm_tokens={"groq": 42})
    unknown = await make_tenant(pg, llm_tokens={"acme-llm": "k"})
    not_object = uuid.uuid4()
    await pg.execute(
        'INSERT INTO tenants (id, llm_tokens) VALUES ($1, \'"{\\"groq\\": \\"k\\"}"\'::jsonb)',
        not_object,
    )
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:
        for tenant, field in [
            (bad_type, "inference_config.auto_failover"),
            (bad_key, "llm_tokens.groq"),
            (unknown, "llm_tokens.acme-llm"),
            (not_object, "llm_tokens"),
        ]:
            with pytest.raises(InvalidTenantConfigError) as info:
                await router.complete_for_tenant(tenant, MSG)
            assert info.value.field == field
            assert str(tenant) in str(info.value)
    assert all(not s.requests for s in sims.all())


async def test_unknown_tenant_policies(pg_dsn: str, sims: Sims) -> None:
    stranger = uuid.uuid4()
    async with TenantLLMRouter(pg_dsn, providers=sims.providers(groq="sys")) as strict:
        with pytest.raises(TenantNotFoundError):
            await strict.complete_for_tenant(stranger, MSG)
        with pytest.raises(TenantNotFoundError):
            await strict.complete_for_tenant("not-a-uuid", MSG)
    async with TenantLLMRouter(
        pg_dsn, providers=sims.providers(groq="sys"), unknown_tenant="system_defaults"
    ) as lenient:
        result = await lenient.complete_for_tenant(stranger, MSG)
    assert (result.provider, result.key_source) == ("groq", "system")
    assert sims.groq.keys_seen() == ["sys"]


async def test_no_usable_provider(pg_dsn: str, pg: asyncpg.Connection, sims: Sims) -> None:
    tenant = await make_tenant(pg, inference_config={"use_system_keys": False})
    async with TenantLLMRouter(pg_dsn, providers=sims.providers(groq="sys")) as router:
        with pytest.raises(NoProviderAvailableError) as info:
            await router.complete_for_tenant(tenant, MSG)
    assert set(info.value.reasons) == {"groq", "openrouter", "llm7"}


async def test_close_drains_queued_rows(pg_dsn: str, pg: asyncpg.Connection, sims: Sims) -> None:
    tenant = await make_tenant(pg, llm_tokens={"groq": "g"})
    # Wide timeouts: this is about draining, and 200 requests at once on a loaded CI machine can
    # take longer than the default connect timeout or the adaptive attempt cap.
    router = TenantLLMRouter(
        pg_dsn,
        providers=sims.providers(),
        connect_timeout=60.0,
        ttft_timeout=60.0,
        attempt_timeout=60.0,  # a fixed cap: no adaptive one learnt from the first answers
        timeout=120.0,
    )
    results = await asyncio.gather(*(router.complete_for_tenant(tenant, MSG) for _ in range(200)))
    await router.close()
    rows = await usage_rows(pg, tenant)
    assert len(rows) == 200
    assert {r["id"] for r in rows} == {r.usage_id for r in results}


async def test_params_and_tool_calls_pass_through(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    tenant = await make_tenant(
        pg, llm_tokens={"llm7": "k"}, inference_config={"preferred_provider": "llm7"}
    )
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:
        result = await router.complete_for_tenant(
            tenant, MSG, temperature=0.2, max_tokens=64, tools=tools
        )
        with pytest.raises(InvalidRequestError):
            await router.complete_for_tenant(tenant, MSG, temperature=object())
    body = sims.llm7.requests[0].body
    assert body is not None
    assert (body["temperature"], body["max_tokens"], body["tools"]) == (0.2, 64, tools)
    assert result.finish_reason == "tool_calls"
    assert result.tool_calls is not None and result.tool_calls[0]["function"]["name"] == "lookup"
    assert len(sims.llm7.requests) == 1  # the unserialisable request never left the process
    # ... so it is no attempt: one row, the success.
    assert [r["status"] for r in await usage_rows(pg, tenant)] == ["success"]


async def test_cached_tokens_are_priced(pg_dsn: str, pg: asyncpg.Connection) -> None:
    from decimal import Decimal

    from llm_gateway.simulator import Behaviour

    tenant = await make_tenant(pg, inference_config={"preferred_provider": "openai"})
    async with SimulatedProvider(name="oai") as sim:
        providers = {"openai": provider_settings("openai", sim.base_url, api_key="sys")}
        sim.script(Behaviour(prompt_tokens=1000, completion_tokens=100, cached_tokens=800))
        async with TenantLLMRouter(pg_dsn, providers=providers) as router:
            result = await router.complete_for_tenant(tenant, MSG)
    # gpt-4o-mini: 0.15 in, 0.60 out, 0.075 cached input per million tokens.
    expected = Decimal("0.000150")  # (200 * 0.15 + 800 * 0.075 + 100 * 0.60) / 1e6
    assert result.cost == expected
    [row] = await usage_rows(pg, tenant)
    assert row["estimated_cost_usd"] == expected
    assert json.loads(row["metadata"])["cached_input_tokens"] == 800


async def test_last_known_config_serves_through_a_database_outage(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    from llm_gateway import ConfigUnavailableError

    known = await make_tenant(
        pg, llm_tokens={"groq": "g"}, inference_config={"preferred_provider": "groq"}
    )
    never_loaded = await make_tenant(pg, llm_tokens={"groq": "g"})
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    async with TenantLLMRouter(
        pg_dsn, pool=pool, providers=sims.providers(), cache_ttl=0.2
    ) as router:
        assert (await router.complete_for_tenant(known, MSG)).provider == "groq"
        await pool.close()  # the config database is gone
        await asyncio.sleep(0.3)  # and the cached entry has expired
        assert (await router.complete_for_tenant(known, MSG)).provider == "groq"
        with pytest.raises(ConfigUnavailableError):
            await router.complete_for_tenant(never_loaded, MSG)
