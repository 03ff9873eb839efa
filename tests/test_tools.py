"""Tools, structured output, images, seed and stop pass through both SDK families.

Over real HTTP through :class:`TenantLLMRouter`: the groq-flavoured simulator behind the groq
SDK, the openai-flavoured one behind the openai SDK; usage rows in real PostgreSQL.
"""

from __future__ import annotations

import copy
import json
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from llm_gateway import TenantLLMRouter, provider_settings
from llm_gateway.errors import MalformedResponseError
from llm_gateway.providers.sse import StreamProgress
from llm_gateway.simulator import Behaviour, SimulatedProvider
from tests.conftest import make_tenant

USER = "weather in Paris?"
MSG = [{"role": "user", "content": USER}]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1},
            },
            "required": ["city"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}},
    },
}
TOOLS = [WEATHER, CLOCK]


@dataclass
class Family:
    sim: SimulatedProvider
    provider: str
    settings: dict[str, Any]


@pytest.fixture(params=["groq", "openai"])
async def family(request: pytest.FixtureRequest) -> AsyncIterator[Family]:
    """One simulated provider behind the groq SDK or behind the openai SDK (OpenRouter)."""
    flavor = request.param
    async with SimulatedProvider(name="sim", flavor=flavor, chunks=6) as sim:
        if flavor == "groq":
            provider = "groq"
            settings = {"groq": provider_settings("groq", sim.root_url, api_key="sys")}
        else:
            provider = "openrouter"
            settings = {"openrouter": provider_settings("openrouter", sim.base_url, api_key="sys")}
        yield Family(sim, provider, settings)


async def tenant(pg: asyncpg.Connection, f: Family) -> uuid.UUID:
    return await make_tenant(pg, inference_config={"preferred_provider": f.provider})


async def usage_rows(pg: asyncpg.Connection, t: uuid.UUID) -> list[dict[str, Any]]:
    found = await pg.fetch(
        "SELECT * FROM model_usage_stats WHERE tenant_id = $1 ORDER BY timestamp, attempt", t
    )
    return [{**r, "metadata": json.loads(r["metadata"] or "null")} for r in found]


def received(f: Family, i: int = 0) -> dict[str, Any]:
    body = f.sim.requests[i].body
    assert body is not None
    return body


def without_ids(calls: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    assert calls is not None
    for call in calls:
        assert isinstance(call["id"], str) and call["id"]
    return [{k: v for k, v in call.items() if k != "id"} for call in calls]


WEATHER_ARGS = {"city": USER, "unit": "celsius", "days": 1}
CLOCK_ARGS = {"timezone": USER}


# --- tools ---------------------------------------------------------------------------------


async def test_forced_tool_call_comes_back_with_json_arguments(
    pg_dsn: str, pg: asyncpg.Connection, family: Family
) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    t = await tenant(pg, family)
    async with TenantLLMRouter(pg_dsn, providers=family.settings) as router:
        result = await router.complete_for_tenant(t, MSG, tools=TOOLS, tool_choice=choice)
    body = received(family)
    assert (body["tools"], body["tool_choice"]) == (TOOLS, choice)
    assert result.finish_reason == "tool_calls" and result.content == ""
    assert result.tool_calls is not None and len(result.tool_calls) == 1
    [call] = result.tool_calls
    assert (call["type"], call["function"]["name"]) == ("function", "get_time")
    assert json.loads(call["function"]["arguments"]) == CLOCK_ARGS
    # The tool call's tokens are reported and land in the row.
    [row] = await usage_rows(pg, t)
    assert result.tokens_output is not None and result.tokens_output > 1
    assert (row["status"], row["output_tokens"]) == ("success", result.tokens_output)
    assert row["metadata"]["finish_reason"] == "tool_calls"


async def test_parallel_tool_calls_streamed_in_pieces_are_assembled(
    pg_dsn: str, pg: asyncpg.Connection, family: Family
) -> None:
    params: dict[str, Any] = {
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": True,
    }
    t = await tenant(pg, family)
    async with TenantLLMRouter(pg_dsn, providers=family.settings) as router:
        complete = await router.complete_for_tenant(t, MSG, **params)
        async with await router.stream_for_tenant(t, MSG, **params) as stream:
            chunks = [c async for c in stream]
    result = stream.result
    assert result is not None
    expected = [
        {
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(WEATHER_ARGS)},
        },
        {"type": "function", "function": {"name": "get_time", "arguments": json.dumps(CLOCK_ARGS)}},
    ]
    for calls in (complete.tool_calls, result.tool_calls):
        assert calls is not None
        # Compare parsed arguments: key order and spacing are the provider's business.
        parsed = [
            {
                **c,
                "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])},
            }
            for c in without_ids(calls)
        ]
        assert parsed == [
            {
                **c,
                "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])},
            }
            for c in expected
        ]
    assert without_ids(result.tool_calls) == without_ids(complete.tool_calls)
    assert result.finish_reason == "tool_calls" and result.content == ""
    # The arguments really arrived in pieces, over several chunks per call.
    deltas = [d for c in chunks for d in c.tool_calls or ()]
    assert len(deltas) >= 2 * 3
    assert {d.get("index") for d in deltas} == {0, 1}
    assert received(family, 1)["parallel_tool_calls"] is True
    # Same answer, same reported tokens: the stream's row counts the tool calls too.
    rows = await usage_rows(pg, t)
    assert [r["status"] for r in rows] == ["success", "success"]
    assert rows[1]["output_tokens"] == result.tokens_output == complete.tokens_output
    assert "tokens_estimated" not in rows[1]["metadata"]


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "x",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _call(index: int, **fields: Any) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, **fields}]}


INTERLEAVED = (
    _chunk(
        {
            "role": "assistant",
            **_call(
                0, id="call_a", type="function", function={"name": "get_weather", "arguments": ""}
            ),
        }
    ),
    _chunk(
        _call(1, id="call_b", type="function", function={"name": "get_time", "arguments": '{"tim'})
    ),
    _chunk(_call(0, function={"arguments": '{"city": '})),
    _chunk(
        {
            "tool_calls": [
                {"index": 1, "function": {"arguments": 'ezone": "UTC"}'}},
                {"index": 0, "function": {"arguments": '"Paris"}'}},
            ]
        }
    ),
    _chunk({}, "tool_calls"),
)


async def test_interleaved_tool_call_deltas_are_assembled_and_estimated(
    pg_dsn: str, pg: asyncpg.Connection, family: Family
) -> None:
    """Deltas of two calls interleaved, one event carrying both; no usage reported."""
    family.sim.fail_with = Behaviour("raw", events=INTERLEAVED)
    t = await tenant(pg, family)
    async with TenantLLMRouter(pg_dsn, providers=family.settings) as router:
        async with await router.stream_for_tenant(t, MSG, tools=TOOLS) as stream:
            [c async for c in stream]
    assert stream.result is not None
    assert stream.result.tool_calls == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"timezone": "UTC"}'},
        },
    ]
    # Unreported usage is estimated from what was produced: the tool calls' text counts.
    [row] = await usage_rows(pg, t)
    produced = len('get_weather{"city": "Paris"}get_time{"timezone": "UTC"}')
    assert row["metadata"]["tokens_estimated"] is True
    assert row["output_tokens"] >= produced // 4


def test_complete_calls_without_index_are_kept_apart() -> None:
    """Some OpenAI-compatible servers send each call whole, without ``index``."""
    progress = StreamProgress("m")
    first = {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    second = {"id": "b", "type": "function", "function": {"name": "g", "arguments": '{"x":1}'}}
    progress.apply(_chunk({"tool_calls": [first]}), "p")
    progress.apply(_chunk({"tool_calls": [second]}, "tool_calls"), "p")
    assert progress.tool_calls() == [first, second]


@pytest.mark.parametrize(
    "delta",
    [
        _call(0, function="f"),
        _call(0, function={"name": "f", "arguments": 5}),
        _call(0, function={"name": ["f"], "arguments": ""}),
    ],
    ids=repr,
)
def test_tool_call_deltas_of_the_wrong_shape_are_malformed(delta: dict[str, Any]) -> None:
    with pytest.raises(MalformedResponseError):
        StreamProgress("m").apply(_chunk(delta), "p")


def test_random_tool_call_deltas_fold_totally() -> None:
    """Any delta sequence either folds into well-typed calls or is a MalformedResponseError."""
    rng = random.Random(1729)
    values: list[Any] = [None, 0, 1, -1, True, "", "a", "call_x", "{", [], {}, 2.5, {"x": 1}]

    def delta() -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for key in ("index", "id", "type"):
            if rng.random() < 0.6:
                fields[key] = rng.choice(values)
        if rng.random() < 0.8:
            fn = {k: rng.choice(values) for k in ("name", "arguments") if rng.random() < 0.7}
            fields["function"] = fn if rng.random() < 0.8 else rng.choice(values)
        return fields

    folded = 0
    for _ in range(2000):
        progress = StreamProgress("m")
        try:
            for _ in range(rng.randint(1, 6)):
                progress.apply(_chunk({"tool_calls": [delta()]}), "p")
        except MalformedResponseError:
            continue
        folded += 1
        for call in progress.tool_calls() or []:
            assert all(type(call[k]) is str for k in ("id", "type"))
            assert all(type(v) is str for v in call["function"].values())
    assert 0 < folded < 2000


# --- structured output -----------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string"}, "verified": {"type": "boolean"}},
            "required": ["zip", "verified"],
            "additionalProperties": False,
        },
        "nickname": {"type": ["string", "null"]},
    },
    "required": ["name", "age", "score", "tags", "address", "nickname"],
    "additionalProperties": False,
}
JSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "person", "strict": True, "schema": SCHEMA},
}


def _check_person(value: Any) -> None:
    assert isinstance(value, dict) and set(value) == set(SCHEMA["properties"])  # type: ignore[arg-type]
    assert isinstance(value["name"], str)
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)
    assert isinstance(value["score"], (int, float))
    assert isinstance(value["tags"], list) and all(isinstance(x, str) for x in value["tags"])
    assert set(value["address"]) == {"zip", "verified"}
    assert isinstance(value["address"]["zip"], str)
    assert isinstance(value["address"]["verified"], bool)
    assert value["nickname"] is None or isinstance(value["nickname"], str)


@pytest.mark.parametrize(
    "fmt", [{"type": "json_object"}, JSON_SCHEMA], ids=["json_object", "json_schema"]
)
async def test_json_mode_answers_valid_json(
    pg_dsn: str, pg: asyncpg.Connection, family: Family, fmt: dict[str, Any]
) -> None:
    t = await tenant(pg, family)
    async with TenantLLMRouter(pg_dsn, providers=family.settings) as router:
        result = await router.complete_for_tenant(t, MSG, response_format=fmt)
        async with await router.stream_for_tenant(t, MSG, response_format=fmt) as stream:
            streamed = "".join([c.content async for c in stream])
    assert received(family, 0)["response_format"] == fmt
    assert received(family, 1)["response_format"] == fmt
    assert stream.result is not None and stream.result.content == streamed
    for content in (result.content, streamed):
        value = json.loads(content)
        assert isinstance(value, dict)
        if fmt["type"] == "json_schema":
            _check_person(value)
    assert json.loads(streamed) == json.loads(result.content)


# --- images, seed, stop ----------------------------------------------------------------------

IMAGE = "data:image/png;base64," + "iVBORw0KGgo" * 4000  # ~44 kB of "image"
WITH_IMAGE = [
    {"role": "system", "content": "Describe images."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        ],
    },
]


async def test_image_parts_reach_the_provider_unchanged(
    pg_dsn: str, pg: asyncpg.Connection, family: Family
) -> None:
    messages = copy.deepcopy(WITH_IMAGE)
    t = await tenant(pg, family)
    async with TenantLLMRouter(pg_dsn, providers=family.settings) as router:
        result = await router.complete_for_tenant(t, messages)
        async with await router.stream_for_tenant(t, messages) as stream:
            streamed = "".join([c.content async for c in stream])
    assert messages == WITH_IMAGE  # the caller's list is not changed either
    assert received(family, 0)["messages"] == WITH_IMAGE
    assert received(family, 1)["messages"] == WITH_IMAGE
    assert result.content == streamed == "[sim] What is in this picture?"


async def test_image_bytes_are_not_estimated_as_prompt_tokens(
    pg_dsn: str, pg: asyncpg.Connection, family: Family
) -> None:
    """Without reported usage the prompt is estimated from its text, not the image's base64."""
    family.sim.fail_with = Behaviour(
        "raw", events=(_chunk({"role": "assistant", "content": "a cat"}), _chunk({}, "stop"))
    )
    t = await tenant(pg, family)
    async with TenantLLMRouter(pg_dsn, providers=family.settings) as router:
        async with await router.stream_for_tenant(t, WITH_IMAGE) as stream:
            [c async for c in stream]
    [row] = await usage_rows(pg, t)
    assert row["metadata"]["tokens_estimated"] is True
    assert 0 < row["input_tokens"] < 1_000  # the data URL alone is ~11 000 "tokens" of text


async def test_seed_and_stop_pass_through(
    pg_dsn: str, pg: asyncpg.Connection, family: Family
) -> None:
    t = await tenant(pg, family)
    async with TenantLLMRouter(pg_dsn, providers=family.settings) as router:
        await router.complete_for_tenant(t, MSG, seed=7, stop=["\n\n", "END"])
        async with await router.stream_for_tenant(t, MSG, seed=7, stop="END") as stream:
            [c async for c in stream]
    assert (received(family, 0)["seed"], received(family, 0)["stop"]) == (7, ["\n\n", "END"])
    assert (received(family, 1)["seed"], received(family, 1)["stop"]) == (7, "END")
