"""An empty answer (a 200 with no content, no tool calls, no completion tokens) is a failure.

Free-tier models on OpenRouter answer this way under load (BerriAI/litellm #14655). Such an
attempt fails over and writes a row with status ``empty_response``; the rule is the same for
completions and streams. Over real HTTP: the simulator, both SDK families, real PostgreSQL.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from llm_gateway import AllProvidersFailedError, TenantLLMRouter, provider_settings
from llm_gateway.errors import EmptyResponseError, ProviderError
from llm_gateway.providers.base import parse_completion
from llm_gateway.simulator import Behaviour, SimulatedProvider
from tests.conftest import make_tenant

MSG = [{"role": "user", "content": "hello"}]


@dataclass
class Pair:
    """The provider under test (``first``) and the one it fails over to (``second``)."""

    first: SimulatedProvider
    second: SimulatedProvider
    first_name: str
    second_name: str
    settings: dict[str, Any]


@pytest.fixture(params=["openrouter", "groq"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    """``first`` is of the parametrised family (openai SDK or groq SDK), ``second`` the other."""
    first_name = request.param
    second_name = "groq" if first_name == "openrouter" else "openrouter"

    def flavor(name: str) -> str:
        return "groq" if name == "groq" else "openai"

    def url(name: str, sim: SimulatedProvider) -> str:
        return sim.root_url if name == "groq" else sim.base_url

    first = SimulatedProvider(name="first", flavor=flavor(first_name))
    second = SimulatedProvider(name="second", flavor=flavor(second_name))
    async with first, second:
        settings = {
            first_name: provider_settings(first_name, url(first_name, first), api_key="sys-1"),
            second_name: provider_settings(second_name, url(second_name, second), api_key="sys-2"),
        }
        yield Pair(first, second, first_name, second_name, settings)


async def tenant(pg: asyncpg.Connection, p: Pair) -> uuid.UUID:
    return await make_tenant(
        pg,
        inference_config={"preferred_provider": p.first_name, "fallback_order": [p.second_name]},
    )


async def usage_rows(pg: asyncpg.Connection, t: uuid.UUID) -> list[dict[str, Any]]:
    found = await pg.fetch(
        "SELECT * FROM model_usage_stats WHERE tenant_id = $1 ORDER BY request_id, attempt", t
    )
    return [{**r, "metadata": json.loads(r["metadata"] or "null")} for r in found]


def _body(message: dict[str, Any], usage: dict[str, Any] | None, finish: str = "stop") -> Any:
    body: dict[str, Any] = {
        "id": "x",
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "x",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


EMPTY_COMPLETIONS: dict[str, Behaviour] = {
    "empty content, zero tokens": Behaviour("ok", content="", completion_tokens=0),
    "whitespace content, zero tokens": Behaviour("ok", content="  \n\t ", completion_tokens=0),
    "null content, no usage": Behaviour(
        "raw", body=_body({"role": "assistant", "content": None}, None)
    ),
    "empty content, completion tokens unreported": Behaviour(
        "raw", body=_body({"role": "assistant", "content": ""}, {"prompt_tokens": 3})
    ),
}


@pytest.mark.parametrize("behaviour", EMPTY_COMPLETIONS.values(), ids=EMPTY_COMPLETIONS.keys())
async def test_empty_completion_fails_over_with_an_empty_response_row(
    pg_dsn: str, pg: asyncpg.Connection, pair: Pair, behaviour: Behaviour
) -> None:
    pair.first.fail_with = behaviour
    t = await tenant(pg, pair)
    async with TenantLLMRouter(pg_dsn, providers=pair.settings) as router:
        result = await router.complete_for_tenant(t, MSG)
    assert (result.provider, result.content) == (pair.second_name, "[second] hello")
    assert [(a.outcome, a.error_class) for a in result.attempts] == [
        ("empty_response", "EmptyResponseError"),
        ("success", None),
    ]
    rows = await usage_rows(pg, t)
    assert [(r["provider"], r["status"]) for r in rows] == [
        (pair.first_name, "empty_response"),
        (pair.second_name, "success"),
    ]


async def test_the_simulator_names_the_empty_answer(
    pg_dsn: str, pg: asyncpg.Connection, pair: Pair
) -> None:
    """``empty_answer``: what a loaded free-tier model sends, for tests and the CLI."""
    pair.first.fail_with = "empty_answer"
    t = await tenant(pg, pair)
    async with TenantLLMRouter(pg_dsn, providers=pair.settings) as router:
        result = await router.complete_for_tenant(t, MSG)
        async with await router.stream_for_tenant(t, MSG) as stream:
            text = "".join([c.content async for c in stream])
    assert result.content == text == "[second] hello"
    assert [r["status"] for r in await usage_rows(pg, t)] == ["empty_response", "success"] * 2


async def test_every_provider_empty_gives_up_with_the_attempts(
    pg_dsn: str, pg: asyncpg.Connection, pair: Pair
) -> None:
    empty = Behaviour("ok", content="", completion_tokens=0)
    pair.first.fail_with = pair.second.fail_with = empty
    t = await tenant(pg, pair)
    async with TenantLLMRouter(pg_dsn, providers=pair.settings) as router:
        with pytest.raises(AllProvidersFailedError) as info:
            await router.complete_for_tenant(t, MSG)
    assert [a.outcome for a in info.value.attempts] == ["empty_response"] * 2
    assert [r["status"] for r in await usage_rows(pg, t)] == ["empty_response"] * 2


async def test_empty_content_with_completion_tokens_spent_is_returned_as_it_is(
    pg_dsn: str, pg: asyncpg.Connection, pair: Pair
) -> None:
    """A reasoning model that ran out at ``finish_reason: "length"``: the tokens were spent."""
    usage = {
        "prompt_tokens": 3,
        "completion_tokens": 16,
        "completion_tokens_details": {"reasoning_tokens": 16},
    }
    pair.first.fail_with = Behaviour(
        "raw", body=_body({"role": "assistant", "content": ""}, usage, finish="length")
    )
    t = await tenant(pg, pair)
    async with TenantLLMRouter(pg_dsn, providers=pair.settings) as router:
        result = await router.complete_for_tenant(t, MSG)
    assert (result.provider, result.content, result.finish_reason) == (
        pair.first_name,
        "",
        "length",
    )
    [row] = await usage_rows(pg, t)
    assert (row["status"], row["output_tokens"]) == ("success", 16)


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
async def test_an_empty_answer_to_a_zero_token_request_is_returned(
    pg_dsn: str, pg: asyncpg.Connection, pair: Pair, limit: str
) -> None:
    pair.first.fail_with = Behaviour("ok", content="", completion_tokens=0)
    t = await tenant(pg, pair)
    async with TenantLLMRouter(pg_dsn, providers=pair.settings) as router:
        result = await router.complete_for_tenant(t, MSG, **{limit: 0})
        async with await router.stream_for_tenant(t, MSG, **{limit: 0}) as stream:
            chunks = [c async for c in stream]
    assert (result.provider, result.content) == (pair.first_name, "")
    assert "".join(c.content for c in chunks) == ""
    assert stream.result is not None and stream.result.provider == pair.first_name
    assert [r["status"] for r in await usage_rows(pg, t)] == ["success", "success"]
    assert [(r.body or {}).get(limit) for r in pair.first.requests] == [0, 0]


# --- streams: the same rule at the end of the read-ahead -------------------------------------

EMPTY_STREAMS: dict[str, str | Behaviour] = {
    "empty content, zero tokens": Behaviour("ok", content="", completion_tokens=0),
    "whitespace content, zero tokens": Behaviour("ok", content=" \n \n ", completion_tokens=0),
    "only [DONE]": "stream_empty",
    "role and finish, no usage": Behaviour(
        "raw", events=(_chunk({"role": "assistant", "content": ""}), _chunk({}, "stop"))
    ),
}


@pytest.mark.parametrize("behaviour", EMPTY_STREAMS.values(), ids=EMPTY_STREAMS.keys())
async def test_empty_stream_fails_over_with_an_empty_response_row(
    pg_dsn: str, pg: asyncpg.Connection, pair: Pair, behaviour: str | Behaviour
) -> None:
    pair.first.fail_with = behaviour
    t = await tenant(pg, pair)
    async with TenantLLMRouter(pg_dsn, providers=pair.settings) as router:
        async with await router.stream_for_tenant(t, MSG) as stream:
            text = "".join([c.content async for c in stream])
    assert text == "[second] hello"
    assert stream.result is not None
    assert [(a.outcome, a.error_class) for a in stream.result.attempts] == [
        ("empty_response", "EmptyResponseError"),
        ("success", None),
    ]
    rows = await usage_rows(pg, t)
    assert [(r["provider"], r["status"]) for r in rows] == [
        (pair.first_name, "empty_response"),
        (pair.second_name, "success"),
    ]


async def test_empty_stream_with_completion_tokens_spent_is_returned(
    pg_dsn: str, pg: asyncpg.Connection, pair: Pair
) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 16}
    pair.first.fail_with = Behaviour(
        "raw",
        events=(
            _chunk({"role": "assistant", "content": ""}),
            _chunk({}, "length"),
            {"id": "x", "model": "m", "choices": [], "usage": usage},
        ),
    )
    t = await tenant(pg, pair)
    async with TenantLLMRouter(pg_dsn, providers=pair.settings) as router:
        async with await router.stream_for_tenant(t, MSG) as stream:
            text = "".join([c.content async for c in stream])
    result = stream.result
    assert text == "" and result is not None
    assert (result.provider, result.content, result.finish_reason, result.tokens_output) == (
        pair.first_name,
        "",
        "length",
        16,
    )
    [row] = await usage_rows(pg, t)
    assert (row["status"], row["output_tokens"]) == ("success", 16)


async def test_leading_whitespace_chunks_reach_the_caller_before_the_content(
    pg_dsn: str, pg: asyncpg.Connection, pair: Pair
) -> None:
    """Whitespace is held back until content decides the stream is not empty, never lost."""
    pair.first.fail_with = Behaviour(
        "raw",
        events=(
            _chunk({"role": "assistant", "content": " "}),
            _chunk({"content": "\n"}),
            _chunk({"content": "hi"}),
            _chunk({}, "stop"),
        ),
    )
    t = await tenant(pg, pair)
    async with TenantLLMRouter(pg_dsn, providers=pair.settings) as router:
        async with await router.stream_for_tenant(t, MSG) as stream:
            pieces = [c.content async for c in stream]
    assert pieces[:3] == [" ", "\n", "hi"]
    assert stream.result is not None and stream.result.content == " \nhi"
    assert [r["status"] for r in await usage_rows(pg, t)] == ["success"]


# --- the rule itself, on parsed bodies ----------------------------------------------------------


def test_empty_response_error_is_a_retryable_provider_error() -> None:
    error = EmptyResponseError("empty", provider="p", model="m")
    assert isinstance(error, ProviderError)
    assert (error.status, error.retryable) == ("empty_response", True)


def test_tool_call_with_empty_content_is_not_empty() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = _body(
        {"role": "assistant", "content": "", "tool_calls": [call]}, {"completion_tokens": 0}
    )
    parsed = parse_completion("p", "m", json.dumps(body).encode(), {})
    assert parsed.tool_calls == [call]
