"""The simulated provider, exercised over real loopback HTTP with the official SDKs and httpx."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import groq
import httpx
import openai
import pytest

from llm_gateway.simulator import BEHAVIOURS, Behaviour, SimulatedProvider, run_simulator

MESSAGES: list[Any] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there, simulator"},
]
EXPECTED = "[sim-a] hello there, simulator"
# prompt: (8 + 22) chars // 4 + 1 = 8; completion: len(EXPECTED) // 4 + 1 = 8
PROMPT_TOKENS = (len("be brief") + len("hello there, simulator")) // 4 + 1
COMPLETION_TOKENS = len(EXPECTED) // 4 + 1
CHAT = {"model": "gpt-test", "messages": MESSAGES}
STREAM = {**CHAT, "stream": True}


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedProvider]:
    async with SimulatedProvider(name="sim-a") as provider:
        yield provider


@pytest.fixture
async def http(sim: SimulatedProvider) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=2.0) as client:
        yield client


async def sse_events(response: httpx.Response) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of an SSE response."""
    events: list[tuple[str | None, str]] = []
    event: str | None = None
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            events.append((event, line[5:].strip()))
            event = None
    return events


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# --- normal answers through the official SDKs ---------------------------------------------------


async def test_openai_sdk_completion(sim: SimulatedProvider) -> None:
    async with openai.AsyncOpenAI(api_key="sk-one", base_url=sim.base_url, max_retries=0) as oc:
        result = await oc.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert result.choices[0].message.content == EXPECTED
    assert result.choices[0].finish_reason == "stop"
    assert result.model == "gpt-test"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (
        PROMPT_TOKENS,
        COMPLETION_TOKENS,
    )
    assert result.usage.total_tokens == PROMPT_TOKENS + COMPLETION_TOKENS
    assert sim.keys_seen() == ["sk-one"]
    [rec] = sim.requests
    assert (rec.method, rec.path, rec.model, rec.stream) == (
        "POST",
        "/v1/chat/completions",
        "gpt-test",
        False,
    )
    assert rec.body is not None and rec.body["messages"] == MESSAGES
    assert rec.headers["authorization"] == "Bearer sk-one"
    assert rec.behaviour == "ok"
    assert rec.received_at <= time.monotonic()


async def test_openai_sdk_stream_with_usage(sim: SimulatedProvider) -> None:
    async with openai.AsyncOpenAI(api_key="sk-two", base_url=sim.base_url, max_retries=0) as oc:
        stream = await oc.chat.completions.create(
            model="gpt-test",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == EXPECTED
    assert len(pieces) == 4  # default number of content chunks
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == COMPLETION_TOKENS
    assert sim.keys_seen() == ["sk-two"]
    assert sim.requests[0].stream is True


async def test_stream_without_include_usage_has_no_usage_chunk(
    sim: SimulatedProvider, http: httpx.AsyncClient
) -> None:
    async with http.stream("POST", "/chat/completions", json=STREAM) as response:
        events = await sse_events(response)
    assert events[-1] == (None, "[DONE]")
    assert all("usage" not in json.loads(data) for _, data in events[:-1])


async def test_groq_sdk_completion_and_stream(sim: SimulatedProvider) -> None:
    sim.flavor = "groq"
    async with groq.AsyncGroq(api_key="gsk-one", base_url=sim.root_url, max_retries=0) as gc:
        result = await gc.chat.completions.create(model="llama-test", messages=MESSAGES)
        stream = await gc.chat.completions.create(
            model="llama-test", messages=MESSAGES, stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert result.choices[0].message.content == EXPECTED
    assert result.usage is not None and result.usage.prompt_tokens == PROMPT_TOKENS
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == EXPECTED
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"
    assert last.x_groq is not None and last.x_groq.usage is not None
    assert last.x_groq.usage.completion_tokens == COMPLETION_TOKENS
    assert all(c.choices for c in chunks)  # no separate usage-only chunk
    assert sim.keys_seen() == ["gsk-one", "gsk-one"]
    assert {r.path for r in sim.requests} == {"/openai/v1/chat/completions"}


async def test_groq_flavor_usage_in_x_groq_over_http(
    sim: SimulatedProvider, http: httpx.AsyncClient
) -> None:
    sim.flavor = "groq"
    body = {**STREAM, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/chat/completions", json=body) as response:
        events = await sse_events(response)
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["x_groq"]["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert all(c["choices"] for c in chunks)


async def test_model_override_and_models_endpoint() -> None:
    async with (
        SimulatedProvider(name="b", model="fixed-model") as other,
        openai.AsyncOpenAI(api_key="k", base_url=other.base_url, max_retries=0) as oc,
    ):
        result = await oc.chat.completions.create(model="whatever", messages=MESSAGES)
        models = await oc.models.list()
    assert result.model == "fixed-model"
    assert result.choices[0].message.content == "[b] hello there, simulator"
    assert [m.id for m in models.data] == ["fixed-model"]
    assert other.keys_seen() == ["k"]  # the /models request is not a chat request
    assert [r.path for r in other.requests] == ["/v1/chat/completions", "/v1/models"]


async def test_tools_yield_a_tool_call(sim: SimulatedProvider) -> None:
    tools: list[Any] = [
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}},
    ]
    async with openai.AsyncOpenAI(api_key="k", base_url=sim.base_url, max_retries=0) as oc:
        result = await oc.chat.completions.create(model="m", messages=MESSAGES, tools=tools)
        stream = await oc.chat.completions.create(
            model="m", messages=MESSAGES, tools=tools, stream=True
        )
        chunks = [chunk async for chunk in stream]
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert (call.function.name, call.function.arguments) == ("lookup", "{}")
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function is not None and calls[0].function.name == "lookup"
    assert "".join((tc.function.arguments or "") for tc in calls if tc.function) == "{}"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_ok_response_headers_and_keep_alive(
    sim: SimulatedProvider, http: httpx.AsyncClient
) -> None:
    first = await http.post("/chat/completions", json=CHAT)
    second = await http.post("/chat/completions", json=CHAT)
    assert first.status_code == second.status_code == 200
    assert int(first.headers["x-ratelimit-remaining-requests"]) == 9999
    assert int(second.headers["x-ratelimit-remaining-requests"]) == 9998
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 1_000_000
    assert sim.open_connections == 1  # both requests reused one keep-alive connection
    await http.aclose()
    await wait_for(lambda: sim.open_connections == 0)


async def test_content_chunks_and_delay_are_configurable(
    sim: SimulatedProvider, http: httpx.AsyncClient
) -> None:
    sim.script(Behaviour("ok", content="abcdef", chunks=2, chunk_delay_ms=30))
    started = time.monotonic()
    async with http.stream("POST", "/chat/completions", json=STREAM) as response:
        events = await sse_events(response)
    elapsed = time.monotonic() - started
    contents = [json.loads(d)["choices"][0]["delta"].get("content") for _, d in events[:-1]]
    assert contents == ["", "abc", "def", None]  # role chunk, 2 pieces, finish chunk
    assert elapsed >= 0.09  # three pauses between four events


async def test_latency_delays_the_answer(sim: SimulatedProvider, http: httpx.AsyncClient) -> None:
    sim.latency_ms = 60
    started = time.monotonic()
    response = await http.post("/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.06
    sim.latency_ms = 20_000  # the scripted behaviour's own latency (none) wins
    sim.script(Behaviour("ok", latency_ms=0))
    started = time.monotonic()
    await http.post("/chat/completions", json=CHAT)
    assert time.monotonic() - started < 10.0


# --- HTTP failure modes ---------------------------------------------------------------------------


async def test_429_with_retry_after(sim: SimulatedProvider, http: httpx.AsyncClient) -> None:
    sim.script("429", Behaviour("429", retry_after=2.5), Behaviour("429", retry_after=None))
    first = await http.post("/chat/completions", json=CHAT)
    assert first.status_code == 429
    assert first.headers["retry-after"] == "1"
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    error = first.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert "Please try again in 5.289s." in error["message"]
    assert (await http.post("/chat/completions", json=CHAT)).headers["retry-after"] == "2.5"
    third = await http.post("/chat/completions", json=CHAT)
    assert third.status_code == 429 and "retry-after" not in third.headers
    sim.retry_after = None
    sim.script("429")
    assert "retry-after" not in (await http.post("/chat/completions", json=CHAT)).headers


async def test_openai_sdk_maps_429_and_exposes_retry_after(sim: SimulatedProvider) -> None:
    sim.fail_with = Behaviour("429", retry_after=3)
    async with openai.AsyncOpenAI(api_key="k", base_url=sim.base_url, max_retries=0) as oc:
        with pytest.raises(openai.RateLimitError) as caught:
            await oc.chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.response.headers["retry-after"] == "3"


@pytest.mark.parametrize("status", ["400", "401", "404", "422", "500", "503"])
async def test_error_statuses(status: str, sim: SimulatedProvider, http: httpx.AsyncClient) -> None:
    sim.script(status)
    response = await http.post("/chat/completions", json=CHAT)
    assert response.status_code == int(status)
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    if status == "401":
        assert error["message"] == "Invalid API Key"
    assert (await http.post("/chat/completions", json=CHAT)).status_code == 200  # script used up


async def test_behaviour_can_override_status_and_message(http: httpx.AsyncClient, sim: Any) -> None:
    sim.script(Behaviour("500", status=502, message="bad gateway", headers={"x-extra": "1"}))
    response = await http.post("/chat/completions", json=CHAT)
    assert response.status_code == 502
    assert response.json()["error"]["message"] == "bad gateway"
    assert response.headers["x-extra"] == "1"


async def test_malformed_empty_html_and_empty_choices_bodies(
    sim: SimulatedProvider, http: httpx.AsyncClient
) -> None:
    sim.script("malformed", "empty", "html", "empty_choices")
    malformed = await http.post("/chat/completions", json=CHAT)
    assert malformed.status_code == 200
    assert malformed.headers["content-type"].startswith("application/json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(malformed.content)
    empty = await http.post("/chat/completions", json=CHAT)
    assert (empty.status_code, empty.headers["content-length"], empty.content) == (200, "0", b"")
    html = await http.post("/chat/completions", json=CHAT)
    assert html.status_code == 200
    assert html.headers["content-type"].startswith("text/html")
    assert html.text.startswith("<!DOCTYPE html>")
    no_choices = await http.post("/chat/completions", json=CHAT)
    assert no_choices.status_code == 200 and no_choices.json()["choices"] == []
    assert sim.open_connections == 1  # all of these keep the connection usable


async def test_sdk_handling_of_bad_200_bodies(sim: SimulatedProvider) -> None:
    """Pins what the official SDKs do, which the router's error classification relies on."""
    async with openai.AsyncOpenAI(api_key="k", base_url=sim.base_url, max_retries=0) as oc:
        sim.script("malformed", "empty", "html")
        with pytest.raises(json.JSONDecodeError):  # not an openai.APIError
            await oc.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(json.JSONDecodeError):
            await oc.chat.completions.create(model="m", messages=MESSAGES)
        html: Any = await oc.chat.completions.create(model="m", messages=MESSAGES)
        assert isinstance(html, str)  # no exception at all: the raw text is returned
    async with groq.AsyncGroq(api_key="k", base_url=sim.root_url, max_retries=0) as gc:
        sim.script("malformed", "html")
        with pytest.raises(json.JSONDecodeError):
            await gc.chat.completions.create(model="m", messages=MESSAGES)
        assert isinstance(await gc.chat.completions.create(model="m", messages=MESSAGES), str)


async def test_drop_closes_without_answer(sim: SimulatedProvider, http: httpx.AsyncClient) -> None:
    sim.script("drop")
    with pytest.raises(httpx.RemoteProtocolError):
        await http.post("/chat/completions", json=CHAT)
    assert (await http.post("/chat/completions", json=CHAT)).status_code == 200
    assert [r.behaviour for r in sim.requests] == ["drop", "ok"]
    async with openai.AsyncOpenAI(api_key="k", base_url=sim.base_url, max_retries=0) as oc:
        sim.script("drop")
        with pytest.raises(openai.APIConnectionError):
            await oc.chat.completions.create(model="m", messages=MESSAGES)


async def test_hang_times_out_without_blocking_others(sim: SimulatedProvider) -> None:
    sim.script("hang")
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=3.0) as slow:
        hanging = asyncio.create_task(slow.post("/chat/completions", json=CHAT))
        await wait_for(lambda: len(sim.requests) == 1)
        async with httpx.AsyncClient(base_url=sim.base_url, timeout=2.0) as fast:
            assert (await fast.post("/chat/completions", json=CHAT)).status_code == 200
        assert not hanging.done()
        with pytest.raises(httpx.ReadTimeout):
            await hanging
    await wait_for(lambda: sim.open_connections == 0)  # the server noticed the client leave


async def test_close_ends_hanging_and_stalled_connections() -> None:
    sim = SimulatedProvider()
    await sim.start()
    sim.script("hang", "stall_before_first")
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=5.0) as client:
        hung = asyncio.create_task(client.post("/chat/completions", json=CHAT))
        stalled = asyncio.create_task(client.post("/chat/completions", json=STREAM))
        await wait_for(lambda: sim.open_connections == 2 and len(sim.requests) == 2)
        await sim.close()
        assert sim.open_connections == 0
        for task in (hung, stalled):
            with pytest.raises(httpx.TransportError):
                await task
    await sim.close()  # idempotent
    assert asyncio.all_tasks() == {asyncio.current_task()}


# --- streaming failure modes ----------------------------------------------------------------------


async def test_stream_error_first(sim: SimulatedProvider, http: httpx.AsyncClient) -> None:
    sim.script("stream_error_first")
    async with http.stream("POST", "/chat/completions", json=STREAM) as response:
        assert response.status_code == 200
        events = await sse_events(response)
    first = json.loads(events[0][1])
    assert first["error"]["code"] == 502 and first["error"]["message"]
    assert first["choices"][0]["finish_reason"] == "error"
    assert len(events) == 1


async def test_stream_error_after_first(sim: SimulatedProvider, http: httpx.AsyncClient) -> None:
    sim.script("stream_error_after_first")
    async with http.stream("POST", "/chat/completions", json=STREAM) as response:
        events = [json.loads(data) for _, data in await sse_events(response)]
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert content == EXPECTED[: len(content)] and content
    assert "error" not in events[0] and events[-1]["error"]["code"] == 502
    assert events[-1]["choices"][0]["finish_reason"] == "error"


async def test_openai_sdk_raises_on_in_band_stream_errors(sim: SimulatedProvider) -> None:
    sim.script("stream_error_after_first", "groq_error_event")
    async with openai.AsyncOpenAI(api_key="k", base_url=sim.base_url, max_retries=0) as oc:
        for expected_chunks in (2, 0):
            stream = await oc.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            got = []
            with pytest.raises(openai.APIError) as caught:
                async for chunk in stream:
                    got.append(chunk)
            assert len(got) == expected_chunks  # role chunk + one content chunk, or nothing
            assert not isinstance(caught.value, openai.APIStatusError)
            assert "stream interrupted" in caught.value.message


async def test_groq_error_event(sim: SimulatedProvider, http: httpx.AsyncClient) -> None:
    sim.script("groq_error_event")
    async with http.stream("POST", "/chat/completions", json=STREAM) as response:
        events = await sse_events(response)
    assert [name for name, _ in events] == ["error"]
    assert json.loads(events[0][1])["error"]["message"]
    async with groq.AsyncGroq(api_key="k", base_url=sim.root_url, max_retries=0) as gc:
        sim.script("groq_error_event")
        stream = await gc.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(groq.APIError):
            async for _ in stream:
                pass


async def test_stream_empty_and_malformed(sim: SimulatedProvider, http: httpx.AsyncClient) -> None:
    sim.script("stream_empty", "stream_malformed")
    async with http.stream("POST", "/chat/completions", json=STREAM) as response:
        assert await sse_events(response) == [(None, "[DONE]")]
    async with http.stream("POST", "/chat/completions", json=STREAM) as response:
        events = await sse_events(response)
    assert json.loads(events[1][1])["choices"][0]["delta"]["content"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(events[-1][1])


async def test_stall_after_first(sim: SimulatedProvider) -> None:
    sim.script("stall_after_first")
    received = b""
    async with (
        httpx.AsyncClient(base_url=sim.base_url, timeout=2.0) as client,
        client.stream("POST", "/chat/completions", json=STREAM) as response,
    ):
        with pytest.raises(httpx.ReadTimeout):
            async for data in response.aiter_bytes():
                received += data
    assert b'"role":"assistant"' in received
    assert received.count(b"data:") == 2 and b"[DONE]" not in received


async def test_client_abandoning_a_slow_stream_frees_the_connection(
    sim: SimulatedProvider, http: httpx.AsyncClient
) -> None:
    sim.script(Behaviour("ok", content="x" * 40, chunks=20, chunk_delay_ms=1000))
    async with http.stream("POST", "/chat/completions", json=STREAM) as response:
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data:")
    # leaving the block early closes the connection mid-stream; the server notices long
    # before the remaining ~19 s of chunks would have been sent
    await wait_for(lambda: sim.open_connections == 0, timeout=10.0)
    assert (await http.post("/chat/completions", json=CHAT)).status_code == 200


async def test_stall_before_first(sim: SimulatedProvider) -> None:
    sim.script("stall_before_first")
    async with (
        httpx.AsyncClient(base_url=sim.base_url, timeout=2.0) as client,
        client.stream("POST", "/chat/completions", json=STREAM) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        with pytest.raises(httpx.ReadTimeout):
            await response.aread()


async def test_stream_only_behaviours_answer_ok_without_stream(
    sim: SimulatedProvider, http: httpx.AsyncClient
) -> None:
    sim.script("stream_error_first", "stall_after_first", "groq_error_event")
    for _ in range(3):
        response = await http.post("/chat/completions", json=CHAT)
        assert response.json()["choices"][0]["message"]["content"] == EXPECTED


# --- choosing behaviours --------------------------------------------------------------------------


async def test_script_then_defaults(sim: SimulatedProvider, http: httpx.AsyncClient) -> None:
    sim.fail_with = "503"
    sim.script("500", "ok")
    statuses = [(await http.post("/chat/completions", json=CHAT)).status_code for _ in range(4)]
    assert statuses == [500, 200, 503, 503]
    sim.fail_with = None
    assert (await http.post("/chat/completions", json=CHAT)).status_code == 200
    sim.script("404")
    sim.reset()
    assert sim.requests == []
    assert (await http.post("/chat/completions", json=CHAT)).status_code == 200
    assert len(sim.requests) == 1


async def test_fail_rate_is_seeded() -> None:
    async def run() -> list[int]:
        sim = SimulatedProvider(fail_rate=0.5, fail_with="429", seed=7)
        async with sim, httpx.AsyncClient(base_url=sim.base_url) as client:
            return [
                (await client.post("/chat/completions", json=CHAT)).status_code for _ in range(40)
            ]

    first, second = await run(), await run()
    assert first == second
    assert set(first) == {200, 429}
    assert 8 <= first.count(429) <= 32


async def test_unknown_paths_and_bad_json(sim: SimulatedProvider, http: httpx.AsyncClient) -> None:
    missing = await http.get("/nope")
    assert missing.status_code == 404 and "error" in missing.json()
    bad = await http.post("/chat/completions", content=b"{not json", headers={"x": "y"})
    assert bad.status_code == 400
    models = await http.get("/models", headers={"authorization": "Bearer sk-m"})
    assert models.json()["data"][0]["id"] == "sim-model"
    assert sim.keys_seen() == []
    assert [r.path for r in sim.requests] == ["/v1/nope", "/v1/chat/completions", "/v1/models"]
    assert sim.requests[1].body is None and sim.requests[1].headers["x"] == "y"


async def test_chunked_request_body(sim: SimulatedProvider, http: httpx.AsyncClient) -> None:
    async def body() -> AsyncIterator[bytes]:
        payload = json.dumps(CHAT).encode()
        yield payload[:10]
        yield payload[10:]

    response = await http.post("/chat/completions", content=body())
    assert response.json()["choices"][0]["message"]["content"] == EXPECTED


def test_unknown_behaviour_rejected() -> None:
    with pytest.raises(ValueError, match="unknown simulator behaviour"):
        SimulatedProvider().script("teapot")
    with pytest.raises(ValueError):
        SimulatedProvider(fail_with="nope")
    with pytest.raises(ValueError):
        SimulatedProvider(fail_rate=1.5)
    assert {"ok", "429", "drop", "hang", "stall_after_first"} <= BEHAVIOURS


# --- command line -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_simulator_subprocess() -> None:
    assert callable(run_simulator)
    port = _free_port()
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    code = f"from llm_gateway.simulator import run_simulator; run_simulator({port})"
    with subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline().strip()
            assert line == f"http://127.0.0.1:{port}/v1", proc.stderr.read()
            response = httpx.get(f"{line}/models", timeout=5)
            assert response.json()["data"][0]["object"] == "model"
            proc.terminate()
            assert proc.wait(timeout=5) == 0  # SIGTERM is a clean stop
            assert proc.stderr.read() == ""
        finally:
            if proc.poll() is None:
                proc.kill()
