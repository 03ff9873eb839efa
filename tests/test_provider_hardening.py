"""Provider responses that must not hurt the gateway: cookies, Retry-After, wrong JSON shapes."""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import orjson
import pytest

from llm_gateway import (
    AllProvidersFailedError,
    MalformedResponseError,
    NoProviderAvailableError,
    ProviderError,
    TenantLLMRouter,
    provider_settings,
)
from llm_gateway.health import HealthRegistry
from llm_gateway.providers.base import parse_completion
from llm_gateway.providers.errors import parse_retry_after
from llm_gateway.providers.sse import StreamProgress
from llm_gateway.simulator import Behaviour, SimulatedProvider
from tests.conftest import make_tenant

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedProvider]:
    async with SimulatedProvider(name="sim") as s:
        yield s


async def usage_rows(conn: asyncpg.Connection, tenant: uuid.UUID) -> list[dict[str, Any]]:
    found = await conn.fetch(
        "SELECT * FROM model_usage_stats WHERE tenant_id = $1 ORDER BY request_id, attempt",
        tenant,
    )
    return [{**r, "metadata": json.loads(r["metadata"] or "null")} for r in found]


# --- 1. cookies never cross tenants ------------------------------------------------------------


@pytest.mark.parametrize("provider", ["groq", "llm7", "openrouter"])
async def test_a_cookie_set_for_one_tenant_is_never_sent_for_another(
    pg_dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider, provider: str
) -> None:
    """Covers both SDK families: the groq SDK (httpx) and the openai SDK (httpx2)."""
    url = sim.root_url if provider == "groq" else sim.base_url
    config = {"preferred_provider": provider, "auto_failover": False}
    a = await make_tenant(pg, llm_tokens={provider: "key-a"}, inference_config=config)
    b = await make_tenant(pg, llm_tokens={provider: "key-b"}, inference_config=config)
    # What Cloudflare in front of a real provider does: a cookie on tenant A's response.
    cookie = "__cf_bm=tenant-a-session; Path=/; HttpOnly"
    sim.script(Behaviour(headers={"set-cookie": cookie}))
    async with TenantLLMRouter(
        pg_dsn, providers={provider: provider_settings(provider, url)}, record_usage=False
    ) as router:
        await router.complete_for_tenant(a, MSG)
        await router.complete_for_tenant(b, MSG)
        async with await router.stream_for_tenant(b, MSG) as stream:
            [c async for c in stream]
    assert sim.keys_seen() == ["key-a", "key-b", "key-b"]
    assert "set-cookie" not in sim.requests[0].headers  # (sanity: it was a response header)
    for request in sim.requests[1:]:
        assert "cookie" not in request.headers, "tenant B's request carried tenant A's cookie"


# --- 3. Retry-After is capped ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("value", "expected_wait"),
    [
        (1e9, 300.0),  # capped: would otherwise disable the key for 31 years
        (86_400.0, 300.0),
        (12.0, 12.0),  # a sane value is kept
        (math.inf, 1.0),  # not a number of seconds: the default wait
        (math.nan, 1.0),
        (-5.0, 0.0),  # in the past: usable at once
    ],
)
async def test_retry_after_is_capped_and_sanitised(
    pg_dsn: str,
    pg: asyncpg.Connection,
    sim: SimulatedProvider,
    value: float,
    expected_wait: float,
) -> None:
    health = HealthRegistry()
    assert health.max_retry_after == 300.0
    t = await make_tenant(
        pg,
        llm_tokens={"llm7": "key-rl"},
        inference_config={"preferred_provider": "llm7", "auto_failover": False},
    )
    # Two: the router waits out a short Retry-After once and tries again.
    # No "try again in" in the message: only the header counts here.
    limited = Behaviour("429", retry_after=value, message="Rate limit reached")
    sim.script(limited, limited)
    async with TenantLLMRouter(
        pg_dsn,
        providers={"llm7": provider_settings("llm7", sim.base_url)},
        record_usage=False,
        health=health,
        timeout=5.0,
    ) as router:
        before = time.monotonic()
        with pytest.raises((AllProvidersFailedError, NoProviderAvailableError)):
            await router.complete_for_tenant(t, MSG)
        after = time.monotonic()
    assert sim.requests[0].headers  # the 429 went over HTTP
    [state] = [s for s in health._state.values() if s.provider == "llm7"]
    # skip_until = (moment of the last 429) + wait, and that moment lies in [before, after].
    assert state.skip_until - after - 1e-6 <= expected_wait <= state.skip_until - before + 1e-6


def test_retry_after_cap_is_configurable_and_covers_the_message_form() -> None:
    clock = Clock()
    health = HealthRegistry(clock=clock, max_retry_after=60.0)
    from llm_gateway.errors import RateLimitError

    state = health.get("groq", "fp")
    # Groq's "try again in 99999m" parses to a huge wait; the registry caps it.
    wait = parse_retry_after({}, "Please try again in 99999m1s")
    assert wait is not None and wait > 1e6
    health.on_failure(state, RateLimitError("rl", provider="groq", retry_after=wait))
    assert state.skip_until - clock.now == 60.0
    # Values no parser produces, should an error carry them anyway.
    for odd, expected in ((math.nan, 1.0), (-3.0, 0.0), (math.inf, 60.0)):
        state = health.get("groq", f"fp-{odd}")
        health.on_failure(state, RateLimitError("rl", provider="groq", retry_after=odd))
        assert state.skip_until - clock.now == expected


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999", "Infinity", "Wed, 99 Foo 2015"])
def test_retry_after_that_is_not_a_finite_number_or_date_is_ignored(value: str) -> None:
    assert parse_retry_after({"retry-after": value}) is None
    assert parse_retry_after({"retry-after-ms": value}) is None


# --- 6. the parsers are total ------------------------------------------------------------------


def _completion(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "x",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
    }
    body.update(changes)
    return body


def _message(**message: Any) -> dict[str, Any]:
    return _completion(choices=[{"index": 0, "message": message, "finish_reason": "stop"}])


MALFORMED_COMPLETIONS: list[Any] = [
    [],
    "hi",
    42,
    None,
    {},
    _completion(choices=[{"message": "hi"}]),
    _completion(choices=["oops"]),
    _completion(choices=[None]),
    _completion(choices=[[]]),
    _completion(choices={"0": {"message": {"content": "hi"}}}),
    _completion(choices="hi"),
    _completion(choices=[{"message": ["hi"]}]),
    _completion(choices=[{"message": 7}]),
    _completion(choices=[{"message": None}]),
    _message(content=42),
    _message(content=["a", "b"]),
    _message(content={"text": "hi"}),
    _message(content=None, tool_calls="call"),
    _message(content=None, tool_calls={"id": "x"}),
    _message(content=None, tool_calls=["x"]),
    _message(content="hi", tool_calls=7),
    {"error": "boom"},
    {"error": {"message": ["x"]}},
]


@pytest.mark.parametrize("body", MALFORMED_COMPLETIONS, ids=repr)
def test_wrong_completion_shapes_are_malformed(body: Any) -> None:
    with pytest.raises(MalformedResponseError):
        parse_completion("p", "req-model", orjson.dumps(body), {})


# Wrong types in fields that do not carry the answer are ignored (the count is "not reported").
TOLERATED_COMPLETIONS: list[tuple[Any, dict[str, Any]]] = [
    (_completion(usage=[1, 2]), {"input_tokens": None, "output_tokens": None}),
    (_completion(usage="12"), {"input_tokens": None}),
    (_completion(usage=12), {"input_tokens": None}),
    (
        _completion(usage={"prompt_tokens": "12", "completion_tokens": "5"}),
        {"input_tokens": 12, "output_tokens": 5},
    ),
    (
        _completion(usage={"prompt_tokens": 12.0, "completion_tokens": 5.5}),
        {"input_tokens": 12, "output_tokens": None},
    ),
    (
        _completion(usage={"prompt_tokens": -1, "completion_tokens": True}),
        {"input_tokens": None, "output_tokens": None},
    ),
    (
        _completion(usage={"prompt_tokens": "-3", "completion_tokens": "1e3"}),
        {"input_tokens": None, "output_tokens": None},
    ),
    (
        _completion(usage={"prompt_tokens": 2**62, "completion_tokens": [4]}),
        {"input_tokens": None, "output_tokens": None},
    ),
    (
        _completion(
            usage={
                "prompt_tokens": 9,
                "completion_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": "3"},
                "completion_tokens_details": ["x"],
            }
        ),
        {"cached_tokens": 3, "reasoning_tokens": None},
    ),
    (
        _completion(usage={"prompt_tokens_details": {"cached_tokens": True}, "prompt_tokens": 1}),
        {"cached_tokens": None, "input_tokens": 1},
    ),
    (_completion(model=42), {"model": "req-model"}),
    (_completion(model=["m"]), {"model": "req-model"}),
    (
        _completion(choices=[{"message": {"content": "hi"}, "finish_reason": 3}]),
        {"finish_reason": None, "content": "hi"},
    ),
    (
        _message(content=None, tool_calls=[{"id": "c", "function": {"name": "f"}}]),
        {"content": "", "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
    ),
    (_message(content="hi", tool_calls=[]), {"content": "hi", "tool_calls": None}),
]


@pytest.mark.parametrize(("body", "expected"), TOLERATED_COMPLETIONS, ids=repr)
def test_wrong_types_in_metadata_fields_are_ignored(body: Any, expected: dict[str, Any]) -> None:
    parsed = parse_completion("p", "req-model", orjson.dumps(body), {})
    for name, value in expected.items():
        assert getattr(parsed, name) == value, name


MALFORMED_CHUNKS: list[Any] = [
    {"choices": "x"},
    {"choices": {"0": {"delta": {"content": "a"}}}},
    {"choices": ["oops"]},
    {"choices": [None]},
    {"choices": [{"delta": "hi"}]},
    {"choices": [{"delta": ["hi"]}]},
    {"choices": [{"delta": {"content": 5}}]},
    {"choices": [{"delta": {"content": {"t": "a"}}}]},
    {"choices": [{"delta": {"tool_calls": "x"}}]},
    {"choices": [{"delta": {"tool_calls": {"index": 0}}}]},
    {"choices": [{"delta": {"tool_calls": [1]}}]},
]


@pytest.mark.parametrize("event", MALFORMED_CHUNKS, ids=repr)
def test_wrong_chunk_shapes_are_malformed(event: Any) -> None:
    with pytest.raises(MalformedResponseError):
        StreamProgress("m").apply(event, "p")


TOLERATED_CHUNKS: list[tuple[Any, dict[str, Any]]] = [
    ({"usage": [1]}, {"input_tokens": None}),
    ({"usage": "x", "choices": []}, {"input_tokens": None}),
    ({"x_groq": "x"}, {"input_tokens": None}),
    ({"x_groq": {"usage": 5}}, {"input_tokens": None}),
    ({"x_groq": {"usage": {"prompt_tokens": "7", "completion_tokens": 2}}}, {"input_tokens": 7}),
    ({"usage": {"prompt_tokens": False, "completion_tokens": -2}}, {"output_tokens": None}),
    ({"model": 5}, {"model": "m"}),
    ({"model": {"x": 1}, "choices": None}, {"model": "m"}),
    ({"choices": [{"delta": {"content": "a"}, "finish_reason": 7}]}, {"finish_reason": None}),
    ({"choices": [{"delta": None, "finish_reason": "stop"}]}, {"finish_reason": "stop"}),
]


@pytest.mark.parametrize(("event", "expected"), TOLERATED_CHUNKS, ids=repr)
def test_wrong_types_in_chunk_metadata_are_ignored(event: Any, expected: dict[str, Any]) -> None:
    progress = StreamProgress("m")
    progress.apply(event, "p")
    for name, value in expected.items():
        assert getattr(progress, name) == value, name


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["null", "bool", "int", "float", "str", "digits"]
    if depth < 3:
        kinds += ["list", "dict"]
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, 1, -1, 7, 2**40, -(2**62)])
    if kind == "float":
        return rng.choice([0.0, 1.5, -2.0, 3.0, 1e300])
    if kind == "str":
        return rng.choice(["", "x", "stop", "error", "tool_calls"])
    if kind == "digits":
        return rng.choice(["0", "12", "-3", "1.5", "٣"])
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["content", "message", "delta", "usage", "choices", "tool_calls", "prompt_tokens"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _mutate(rng: random.Random, value: Any) -> Any:
    """``value`` with one randomly chosen subtree replaced by a random JSON value."""
    if rng.random() < 0.25 or not isinstance(value, (dict, list)) or not value:
        return _random_json(rng)
    if isinstance(value, dict):
        key = rng.choice(list(value))
        return {**value, key: _mutate(rng, value[key])}
    i = rng.randrange(len(value))
    return [*value[:i], _mutate(rng, value[i]), *value[i + 1 :]]


def _check_total(parse: Callable[[Any], object], samples: list[Any]) -> int:
    parsed = 0
    for sample in samples:
        try:
            parse(sample)
        except ProviderError:
            continue  # MalformedResponseError, or the typed error a chunk carries
        parsed += 1
    return parsed


def test_random_shapes_never_escape_as_anything_but_provider_errors() -> None:
    rng = random.Random(20240718)
    completion = _completion(
        choices=[
            {
                "message": {"content": "hi", "tool_calls": [{"id": "c", "function": {}}]},
                "finish_reason": "stop",
            }
        ],
        usage={
            "prompt_tokens": 1,
            "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": 1},
            "completion_tokens_details": {"reasoning_tokens": 1},
        },
    )
    chunk = {
        "model": "m",
        "choices": [{"delta": {"content": "a", "tool_calls": [{"index": 0}]}}],
        "usage": completion["usage"],
        "x_groq": {"usage": completion["usage"]},
    }

    def parse_one(body: Any) -> object:
        parsed = parse_completion("p", "m", orjson.dumps(body), {})
        assert isinstance(parsed.content, str) and isinstance(parsed.model, str)
        assert parsed.finish_reason is None or isinstance(parsed.finish_reason, str)
        assert parsed.tool_calls is None or all(isinstance(t, dict) for t in parsed.tool_calls)
        for count in (parsed.input_tokens, parsed.output_tokens, parsed.cached_tokens):
            assert count is None or (type(count) is int and count >= 0)
        return parsed

    def apply_one(event: Any) -> object:
        progress = StreamProgress("m")
        out = progress.apply(event, "p") if isinstance(event, dict) else None
        assert isinstance(progress.model, str)
        for count in (progress.input_tokens, progress.output_tokens, progress.cached_tokens):
            assert count is None or (type(count) is int and count >= 0)
        assert all(isinstance(p, str) for p in progress.parts)
        return out

    completions = [_mutate(rng, completion) for _ in range(3000)]
    chunks = [_mutate(rng, chunk) for _ in range(3000)]
    # Both outcomes occur: the mutations are neither all harmless nor all fatal.
    assert 0 < _check_total(parse_one, completions) < len(completions)
    assert 0 < _check_total(apply_one, chunks) < len(chunks)


# --- 6, end to end: a wrong shape fails over and both attempts are rows --------------------------


@pytest.fixture
async def pair() -> AsyncIterator[tuple[SimulatedProvider, SimulatedProvider]]:
    async with SimulatedProvider(name="first") as first, SimulatedProvider(name="second") as second:
        yield first, second


def _two(first: SimulatedProvider, second: SimulatedProvider) -> dict[str, Any]:
    return {
        "openrouter": provider_settings("openrouter", first.base_url, api_key="sys-or"),
        "groq": provider_settings("groq", second.root_url, api_key="sys-groq"),
    }


async def _failover_tenant(pg: asyncpg.Connection) -> uuid.UUID:
    return await make_tenant(
        pg, inference_config={"preferred_provider": "openrouter", "fallback_order": ["groq"]}
    )


@pytest.mark.parametrize(
    "body",
    [
        _completion(choices=[{"message": "hi"}]),
        _completion(choices=["oops"]),
        _message(content=None, tool_calls="call"),
    ],
    ids=repr,
)
async def test_wrong_shape_fails_over_with_both_rows(
    pg_dsn: str,
    pg: asyncpg.Connection,
    pair: tuple[SimulatedProvider, SimulatedProvider],
    body: Any,
) -> None:
    first, second = pair
    first.fail_with = Behaviour("raw", body=body)
    t = await _failover_tenant(pg)
    async with TenantLLMRouter(pg_dsn, providers=_two(first, second)) as router:
        result = await router.complete_for_tenant(t, MSG)
    assert result.provider == "groq" and result.content == "[second] hello"
    assert [a.error_class for a in result.attempts] == ["MalformedResponseError", None]
    rows = await usage_rows(pg, t)
    assert [(r["provider"], r["status"], r["attempt"]) for r in rows] == [
        ("openrouter", "error", 1),
        ("groq", "success", 2),
    ]


async def test_wrong_usage_types_still_succeed_with_counts_unreported(
    pg_dsn: str, pg: asyncpg.Connection, pair: tuple[SimulatedProvider, SimulatedProvider]
) -> None:
    first, second = pair
    body = _completion(usage={"prompt_tokens": "12", "completion_tokens": [1]})
    first.fail_with = Behaviour("raw", body=body)
    t = await _failover_tenant(pg)
    async with TenantLLMRouter(pg_dsn, providers=_two(first, second)) as router:
        result = await router.complete_for_tenant(t, MSG)
    assert (result.provider, result.content) == ("openrouter", "hi")
    [row] = await usage_rows(pg, t)
    assert (row["input_tokens"], row["output_tokens"]) == (12, None)
    assert row["status"] == "success" and row["estimated_cost_usd"] is None


@pytest.mark.parametrize(
    "events",
    [
        ({"choices": ["oops"]},),
        ({"choices": [{"delta": "hi"}]},),
        ({"choices": [{"delta": {"content": 5}}]},),
        ({"choices": [{"delta": {"tool_calls": "x"}}]},),
    ],
    ids=repr,
)
async def test_wrong_chunk_shape_before_first_chunk_fails_over(
    pg_dsn: str,
    pg: asyncpg.Connection,
    pair: tuple[SimulatedProvider, SimulatedProvider],
    events: tuple[Any, ...],
) -> None:
    first, second = pair
    first.fail_with = Behaviour("raw", events=events)
    t = await _failover_tenant(pg)
    async with TenantLLMRouter(pg_dsn, providers=_two(first, second)) as router:
        async with await router.stream_for_tenant(t, MSG) as stream:
            text = "".join([c.content async for c in stream])
    assert text == "[second] hello"
    rows = await usage_rows(pg, t)
    assert [(r["provider"], r["status"]) for r in rows] == [
        ("openrouter", "error"),
        ("groq", "success"),
    ]
    assert stream.result is not None
    assert [a.error_class for a in stream.result.attempts] == ["MalformedResponseError", None]
