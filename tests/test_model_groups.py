"""Model groups, ``model=`` routing and context-window fallback.

Real PostgreSQL, simulated providers over loopback HTTP, the official SDKs in between.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from llm_gateway import TenantLLMRouter, provider_settings
from llm_gateway.chain import build_route, order_chain, route_for
from llm_gateway.config import InvalidModelGroupsError, parse_model_groups, parse_tenant_config
from llm_gateway.errors import (
    AllProvidersFailedError,
    BadRequestError,
    ContextWindowExceededError,
    InvalidTenantConfigError,
    NoProviderAvailableError,
    UnknownModelError,
)
from llm_gateway.health import HealthRegistry
from llm_gateway.keys import Fingerprinter
from llm_gateway.simulator import Behaviour, SimulatedProvider
from tests.conftest import make_tenant

MSG = [{"role": "user", "content": "hello"}]
T = uuid.UUID("00000000-0000-0000-0000-0000000000cc")

# Windows the tests configure, so which entry is "larger" is explicit.
WINDOWS = {
    "groq": {"small-8k": 8_192, "big-128k": 131_072, "llama-3.3-70b-versatile": 131_072},
    "openrouter": {"tiny-4k": 4_096, "huge-1m": 1_000_000, "deepseek/deepseek-r1": 163_840},
    "llm7": {"mid-32k": 32_768, "gpt-4o": 128_000, "gpt-4o-mini": 128_000},
}


class Sims:
    def __init__(self) -> None:
        self.groq = SimulatedProvider(name="groq", flavor="groq")
        self.openrouter = SimulatedProvider(name="openrouter")
        self.llm7 = SimulatedProvider(name="llm7")

    def all(self) -> list[SimulatedProvider]:
        return [self.groq, self.openrouter, self.llm7]

    def providers(self, **system_keys: str | None) -> dict[str, Any]:
        return {
            "groq": provider_settings(
                "groq", self.groq.root_url, api_key=system_keys.get("groq"), models=WINDOWS["groq"]
            ),
            "openrouter": provider_settings(
                "openrouter",
                self.openrouter.base_url,
                api_key=system_keys.get("openrouter"),
                models=WINDOWS["openrouter"],
            ),
            "llm7": provider_settings(
                "llm7", self.llm7.base_url, api_key=system_keys.get("llm7"), models=WINDOWS["llm7"]
            ),
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


def served(sim: SimulatedProvider) -> list[str | None]:
    return [r.model for r in sim.requests]


async def usage_rows(conn: asyncpg.Connection, tenant: uuid.UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT provider, model_name, status, attempt, error_message FROM model_usage_stats"
        " WHERE tenant_id = $1 ORDER BY request_id, attempt",
        tenant,
    )


ALL_KEYS = {"groq": "gsk-t", "openrouter": "or-t", "llm7": "l7-t"}


def group(*members: str) -> list[dict[str, str]]:
    """A model group's entries from "provider/model" strings (the model may hold a "/")."""
    return [dict(zip(("provider", "model"), m.split("/", 1), strict=True)) for m in members]


# --- validation --------------------------------------------------------------------------


def test_model_groups_are_validated_with_dotted_paths() -> None:
    config = parse_tenant_config(
        T,
        {},
        {"model_groups": {"smart": group("OpenRouter (DeepSeek R1)/huge-1m", "groq/big-128k")}},
    )
    smart = config.inference.model_groups["smart"]
    assert [(e.provider, e.model) for e in smart] == [
        ("openrouter", "huge-1m"),
        ("groq", "big-128k"),
    ]

    cases = {
        "inference_config.model_groups.smart": [],
        "inference_config.model_groups.smart.0.provider": group("anthropic/x"),
        "inference_config.model_groups.smart.0.model": [{"provider": "groq"}],
        "inference_config.model_groups.smart.0.modle": [
            {"provider": "groq", "model": "x", "modle": "y"}
        ],
        "inference_config.model_groups.smart.1": group("groq/x", "Groq/x"),
    }
    for path, entries in cases.items():
        with pytest.raises(InvalidTenantConfigError) as info:
            parse_tenant_config(T, {}, {"model_groups": {"smart": entries}})
        assert info.value.field == path, (path, str(info.value))
    with pytest.raises(InvalidTenantConfigError) as info:
        parse_tenant_config(T, {}, {"model_groups": ["smart"]})
    assert info.value.field == "inference_config.model_groups"
    assert "expected an object, got an array" in str(info.value)


def test_router_model_groups_are_validated_like_a_tenants() -> None:
    groups = parse_model_groups({"cheap": group("groq/small-8k")})
    assert groups["cheap"][0].provider == "groq"
    with pytest.raises(InvalidModelGroupsError) as info:
        parse_model_groups({"cheap": group("nope/m")})
    assert info.value.field == "model_groups.cheap.0.provider"
    with pytest.raises(InvalidModelGroupsError):
        TenantLLMRouter("postgresql://x@127.0.0.1/db", model_groups={"bad": []})


def test_group_route_order_exclusions_and_auto_failover() -> None:
    providers = {
        "groq": provider_settings("groq", "http://127.0.0.1:9", models=WINDOWS["groq"]),
        "llm7": provider_settings("llm7", "http://127.0.0.1:9/v1", models=WINDOWS["llm7"]),
    }
    members = [
        {"provider": "groq", "model": "small-8k"},
        {"provider": "openai", "model": "gpt-4o"},  # no settings in this router
        {"provider": "groq", "model": "big-128k"},  # one provider twice: two entries
        {"provider": "llm7", "model": "mid-32k"},
    ]
    inference: dict[str, Any] = {"preferred_provider": "llm7", "model_groups": {"g": members}}
    config = parse_tenant_config(T, {"groq": "g", "llm7": "l", "openai": "o"}, inference)
    route = build_route(config, providers, lambda p, m: None, Fingerprinter("x"))
    group = route_for(route, "g")
    chain = order_chain(group, HealthRegistry(), 100, 0.0)
    assert [(e.provider, e.model) for e in chain] == [
        ("groq", "small-8k"),
        ("groq", "big-128k"),
        ("llm7", "mid-32k"),
    ]
    assert group.excluded == {
        "openai/gpt-4o": "tenant has a key but the router has no settings for this provider"
    }
    usual = order_chain(route, HealthRegistry(), 100, 0.0)
    assert (usual[0].provider, usual[0].model) == ("llm7", "gpt-4o-mini")  # preferred, as always
    strict = parse_tenant_config(T, {"groq": "g"}, {**inference, "auto_failover": False})
    strict_group = route_for(
        build_route(strict, providers, lambda p, m: None, Fingerprinter("x")), "g"
    )
    assert [
        (e.provider, e.model) for e in order_chain(strict_group, HealthRegistry(), 100, 0.0)
    ] == [("groq", "small-8k")]


# --- routing over a group ----------------------------------------------------------------


async def test_group_routes_in_its_own_order_not_the_preferred_provider(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    tenant = await make_tenant(
        pg,
        llm_tokens=ALL_KEYS,
        inference_config={
            "preferred_provider": "llm7",
            "model_groups": {"smart": group("openrouter/huge-1m", "groq/big-128k", "llm7/mid-32k")},
        },
    )
    sims.openrouter.script("503")
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:
        result = await router.complete_for_tenant(tenant, MSG, model="smart")
        usual = await router.complete_for_tenant(tenant, MSG)
    assert [(a.provider, a.model) for a in result.attempts] == [
        ("openrouter", "huge-1m"),
        ("groq", "big-128k"),
    ]
    assert (result.provider, result.requested_model) == ("groq", "big-128k")
    assert served(sims.openrouter) == ["huge-1m"] and served(sims.groq) == ["big-128k"]
    # Without model= the tenant's usual chain (llm7 preferred) is untouched.
    assert usual.provider == "llm7" and served(sims.llm7) == ["gpt-4o-mini"]
    rows = await usage_rows(pg, tenant)
    assert [(r["provider"], r["model_name"], r["status"]) for r in rows[:2]] == [
        ("openrouter", "huge-1m", "error"),
        ("groq", "big-128k", "success"),
    ]


async def test_tenant_group_wins_over_the_routers_and_router_groups_apply(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    own = await make_tenant(
        pg,
        llm_tokens=ALL_KEYS,
        inference_config={"model_groups": {"fast": group("llm7/mid-32k")}},
    )
    plain = await make_tenant(pg, llm_tokens=ALL_KEYS)
    router_groups = {
        "fast": group("groq/small-8k"),
        "big": group("openrouter/huge-1m"),
    }
    async with TenantLLMRouter(
        pg_dsn, providers=sims.providers(), model_groups=router_groups
    ) as router:
        a = await router.complete_for_tenant(own, MSG, model="fast")
        b = await router.complete_for_tenant(plain, MSG, model="fast")
        c = await router.complete_for_tenant(own, MSG, model="big")
    assert (a.provider, a.requested_model) == ("llm7", "mid-32k")
    assert (b.provider, b.requested_model) == ("groq", "small-8k")
    assert (c.provider, c.requested_model) == ("openrouter", "huge-1m")
    # The tenant's own keys, as for its usual chain.
    assert sims.llm7.keys_seen() == ["l7-t"] and sims.groq.keys_seen() == ["gsk-t"]


async def test_group_keeps_the_system_key_rules(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    strict = await make_tenant(
        pg,
        llm_tokens={"llm7": "l7-t"},
        inference_config={
            "use_system_keys": False,
            "model_groups": {"g": group("groq/big-128k")},
        },
    )
    lenient = await make_tenant(
        pg, inference_config={"model_groups": {"g": group("groq/big-128k")}}
    )
    async with TenantLLMRouter(pg_dsn, providers=sims.providers(groq="gsk-sys")) as router:
        with pytest.raises(NoProviderAvailableError) as info:
            await router.complete_for_tenant(strict, MSG, model="g")
        ok = await router.complete_for_tenant(lenient, MSG, model="g")
    assert "system keys are disabled" in info.value.reasons["groq/big-128k"]
    assert (ok.provider, ok.key_source) == ("groq", "system")
    assert sims.groq.keys_seen() == ["gsk-sys"]


async def test_unknown_group_is_a_clear_error_and_sends_nothing(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    tenant = await make_tenant(
        pg,
        llm_tokens=ALL_KEYS,
        inference_config={"model_groups": {"smart": group("groq/big-128k")}},
    )
    async with TenantLLMRouter(
        pg_dsn,
        providers=sims.providers(),
        model_groups={"cheap": group("groq/small-8k")},
    ) as router:
        with pytest.raises(UnknownModelError) as info:
            await router.complete_for_tenant(tenant, MSG, model="smrat")
    assert info.value.parameter == "model"
    assert info.value.groups == ("cheap", "smart")
    assert "'smrat'" in str(info.value) and "cheap, smart" in str(info.value)
    assert all(sim.requests == [] for sim in sims.all())
    assert await usage_rows(pg, tenant) == []


async def test_concrete_model_routes_to_the_providers_that_serve_it(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    tenant = await make_tenant(
        pg, llm_tokens=ALL_KEYS, inference_config={"preferred_provider": "groq"}
    )
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:
        first = await router.complete_for_tenant(tenant, MSG, model="gpt-4o")
        with pytest.raises(AllProvidersFailedError) as info:
            sims.llm7.script("503")
            await router.complete_for_tenant(tenant, MSG, model="gpt-4o")
    # Only llm7 serves gpt-4o here: its 503 is not failed over to groq (another model).
    assert [a.provider for a in info.value.attempts] == ["llm7"]
    assert first.provider == "llm7" and served(sims.llm7)[-1] == "gpt-4o"
    assert sims.groq.requests == [] and sims.openrouter.requests == []


# --- context-window fallback ----------------------------------------------------------------


def context_400(limit: int) -> Behaviour:
    return Behaviour(
        "context_length",
        message=f"This model's maximum context length is {limit} tokens. However, your"
        " messages resulted in 9000 tokens. Please reduce the length of the messages.",
    )


async def test_context_length_400_in_a_group_moves_to_a_larger_window(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    tenant = await make_tenant(
        pg,
        llm_tokens=ALL_KEYS,
        inference_config={
            "model_groups": {
                "long": [
                    {"provider": "groq", "model": "small-8k"},
                    {"provider": "openrouter", "model": "tiny-4k"},  # smaller: skipped
                    {"provider": "llm7", "model": "mid-32k"},
                ]
            }
        },
    )
    sims.groq.script(context_400(8192))
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:
        result = await router.complete_for_tenant(tenant, MSG, model="long")
    assert [(a.provider, a.error_class) for a in result.attempts] == [
        ("groq", "ContextWindowExceededError"),
        ("llm7", None),
    ]
    assert sims.openrouter.requests == []
    rows = await usage_rows(pg, tenant)
    assert [(r["provider"], r["status"], r["attempt"]) for r in rows] == [
        ("groq", "error", 1),
        ("llm7", "success", 2),
    ]
    # A context-length refusal says nothing about the key: its breaker is untouched.
    groq = next(h for h in router.health() if h["provider"] == "groq")
    assert groq["consecutive_failures"] == 0


async def test_context_length_400_in_a_stream_group_moves_on(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    tenant = await make_tenant(
        pg,
        llm_tokens=ALL_KEYS,
        inference_config={"model_groups": {"long": group("llm7/mid-32k", "openrouter/huge-1m")}},
    )
    sims.llm7.script(context_400(32768))
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:
        async with await router.stream_for_tenant(tenant, MSG, model="long") as stream:
            text = "".join([c.content async for c in stream])
    assert text == "[openrouter] hello"
    assert [a.provider for a in stream.result.attempts] == ["llm7", "openrouter"]


async def test_context_length_400_with_no_larger_entry_is_final(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    tenant = await make_tenant(
        pg,
        llm_tokens=ALL_KEYS,
        inference_config={"model_groups": {"g": group("llm7/mid-32k", "groq/small-8k")}},
    )
    sims.llm7.script(context_400(32768))
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:
        with pytest.raises(ContextWindowExceededError) as info:
            await router.complete_for_tenant(tenant, MSG, model="g")
    assert [a.provider for a in info.value.attempts] == ["llm7"]
    assert sims.groq.requests == []


async def test_context_length_400_outside_a_group_stays_final(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    tenant = await make_tenant(
        pg, llm_tokens=ALL_KEYS, inference_config={"preferred_provider": "groq"}
    )
    sims.groq.script(context_400(8192))
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:
        with pytest.raises(ContextWindowExceededError) as info:
            await router.complete_for_tenant(tenant, MSG)
    assert isinstance(info.value, BadRequestError) and info.value.status_code == 400
    assert [a.provider for a in info.value.attempts] == ["groq"]
    assert sims.openrouter.requests == [] and sims.llm7.requests == []


async def test_estimated_tokens_skips_group_entries_too_small_up_front(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    tenant = await make_tenant(
        pg,
        llm_tokens=ALL_KEYS,
        inference_config={"model_groups": {"g": group("groq/small-8k", "llm7/mid-32k")}},
    )
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:
        result = await router.complete_for_tenant(tenant, MSG, model="g", estimated_tokens=20_000)
        explained = await router.explain(tenant, 20_000, model="g")
    assert [a.provider for a in result.attempts] == ["llm7"]
    assert sims.groq.requests == []
    assert explained["excluded"]["groq/small-8k"] == "small-8k holds 8192 tokens, 20000 needed"
    assert explained["group"] == "g"


# --- recognising the 400 -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "behaviour"),
    [
        # OpenAI: code "context_length_exceeded".
        ("llm7", Behaviour("context_length")),
        # Groq: the code, and a message without numbers.
        (
            "groq",
            Behaviour(
                "context_length", message="Please reduce the length of the messages or completion."
            ),
        ),
        # OpenRouter: "code": 400 (a number), recognised by its message.
        (
            "openrouter",
            Behaviour(
                "400",
                message="This endpoint's maximum context length is 163840 tokens. However, you"
                " requested about 200000 tokens (200000 of text input). Please reduce the length"
                ' of either one, or use the "middle-out" transform to compress your prompt'
                " automatically.",
            ),
        ),
    ],
)
async def test_context_length_400s_are_recognised(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims, provider: str, behaviour: Behaviour
) -> None:
    tenant = await make_tenant(
        pg, llm_tokens=ALL_KEYS, inference_config={"preferred_provider": provider}
    )
    getattr(sims, provider).script(behaviour)
    async with TenantLLMRouter(pg_dsn, providers=sims.providers()) as router:
        with pytest.raises(ContextWindowExceededError):
            await router.complete_for_tenant(tenant, MSG)
        getattr(sims, provider).script("400")  # a plain 400 stays a plain BadRequestError
        with pytest.raises(BadRequestError) as plain:
            await router.complete_for_tenant(tenant, MSG)
    assert not isinstance(plain.value, ContextWindowExceededError)


async def test_a_router_group_never_carries_one_tenants_key_to_another(
    pg_dsn: str, pg: asyncpg.Connection, sims: Sims
) -> None:
    tenants = {
        await make_tenant(pg, llm_tokens={"groq": f"gsk-tenant-{i}"}): f"gsk-tenant-{i}"
        for i in range(5)
    }
    keyless = await make_tenant(pg)
    groups = {"g": group("groq/big-128k")}
    async with TenantLLMRouter(
        pg_dsn, providers=sims.providers(groq="gsk-system"), model_groups=groups
    ) as router:
        for tenant in [*tenants, keyless, *tenants]:
            await router.complete_for_tenant(tenant, MSG, model="g")
    expected = [*tenants.values(), "gsk-system", *tenants.values()]
    assert sims.groq.keys_seen() == expected
