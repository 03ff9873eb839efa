"""The gateway server under a real uvicorn on loopback, called with the official openai client.

Real PostgreSQL (virtual keys, usage rows, quotas), simulated providers over loopback HTTP;
nothing of the project is mocked. Each test runs its own app on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
import uvicorn
from openai import AsyncOpenAI

from llm_gateway import TenantLLMRouter, provider_settings
from llm_gateway.errors import AllProvidersFailedError
from llm_gateway.server.app import create_app
from llm_gateway.server.errors import api_error
from llm_gateway.server.virtual_keys import VirtualKeyStore
from llm_gateway.simulator import Behaviour, SimulatedProvider
from llm_gateway.types import Attempt
from tests.conftest import make_tenant
from tests.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[1]
MSG = [{"role": "user", "content": "hello there"}]
ERROR_FIELDS = {"message", "type", "param", "code"}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(60):
            while not server.started:
                if task.done():
                    await task  # a failed startup raises here
                    raise RuntimeError("uvicorn exited before it started")
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@dataclass
class Served:
    """A running gateway: its URL, simulator, router, key store and one tenant with a key."""

    url: str
    sim: SimulatedProvider
    router: TenantLLMRouter
    keys: VirtualKeyStore
    tenant: uuid.UUID
    key: str
    key_id: uuid.UUID

    def client(self, key: str | None = None, **kwargs: Any) -> AsyncOpenAI:
        return AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=key or self.key, max_retries=0, **kwargs
        )

    async def rows(self, tenant: uuid.UUID | None = None) -> list[asyncpg.Record]:
        tracker = self.router.usage_tracker
        assert tracker is not None
        await tracker.flush(timeout=30)
        conn = await asyncpg.connect(self.router.dsn)
        try:
            return await conn.fetch(
                "SELECT * FROM model_usage_stats WHERE tenant_id = $1 ORDER BY timestamp",
                tenant or self.tenant,
            )
        finally:
            await conn.close()


@contextlib.asynccontextmanager
async def gateway(
    pg_dsn: str,
    pg: asyncpg.Connection,
    tmp_path: Path,
    *,
    inference_config: Mapping[str, Any] | None = None,
    pool_dsn: str | None = None,
    app_kwargs: Mapping[str, Any] | None = None,
    **router_kwargs: Any,
) -> AsyncIterator[Served]:
    tenant = await make_tenant(pg, inference_config=inference_config or {})
    async with SimulatedProvider(name="a") as sim:
        providers = {"openai": provider_settings("openai", sim.base_url, api_key="sk-system")}
        router = TenantLLMRouter(
            pg_dsn, providers=providers, spool_dir=tmp_path / "spool", **router_kwargs
        )
        pool = await asyncpg.create_pool(pool_dsn or pg_dsn, min_size=1, max_size=4)
        keys = VirtualKeyStore(pool)
        try:
            app = create_app(router, keys, pool=pool, readiness_timeout=2.0, **(app_kwargs or {}))
            async with serving(app) as url:
                raw, record = await keys.create(tenant, name="test")
                yield Served(url, sim, router, keys, tenant, raw, record.id)
        finally:
            await router.close()
            await keys.close()
            await pool.close()


@pytest.fixture
async def served(pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path) -> AsyncIterator[Served]:
    async with gateway(pg_dsn, pg, tmp_path) as found:
        yield found


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    """The error object of an OpenAI-shaped error body (asserting the shape)."""
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_FIELDS
    assert "Traceback" not in exc.response.text
    return dict(body["error"])


# --- completions -----------------------------------------------------------------------------


async def test_completion_with_labels_in_the_usage_row(served: Served) -> None:
    answer = await served.client().chat.completions.create(
        model="gpt-4o-mini",
        messages=MSG,
        user="body-user",
        extra_headers={"x-llm-gateway-session": "chat-7", "x-llm-gateway-tags": "search, beta"},
    )
    assert answer.object == "chat.completion"
    assert answer.id.startswith("chatcmpl-")
    assert answer.model == "gpt-4o-mini"
    (choice,) = answer.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "[a] hello there"
    assert choice.finish_reason == "stop"
    assert answer.usage is not None and answer.usage.total_tokens > 0
    (row,) = await served.rows()
    assert row["status"] == "success"
    assert row["endpoint"] == "/v1/chat/completions"
    assert (row["user_id"], row["session_id"], row["tags"]) == (
        "body-user",
        "chat-7",
        ["search", "beta"],
    )
    assert row["request_id"].hex == answer.id.removeprefix("chatcmpl-")
    assert row["virtual_key_id"] == str(served.key_id)
    # The user header wins over the body's user.
    await served.client().chat.completions.create(
        model="gpt-4o-mini", messages=MSG, user="body", extra_headers={"x-llm-gateway-user": "hdr"}
    )
    assert (await served.rows())[-1]["user_id"] == "hdr"
    # A key issued to a user speaks for that user, whatever the request says.
    owned, _ = await served.keys.create(served.tenant, user_id="owner")
    await served.client(owned).chat.completions.create(
        model="gpt-4o-mini", messages=MSG, user="body", extra_headers={"x-llm-gateway-user": "hdr"}
    )
    assert (await served.rows())[-1]["user_id"] == "owner"
    # The key's value is in no row.
    assert all(served.key not in json.dumps(dict(r), default=str) for r in await served.rows())


async def test_stream_is_what_the_openai_client_parses(served: Served) -> None:
    stream = await served.client().chat.completions.create(
        model="gpt-4o-mini",
        messages=MSG,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-llm-gateway-session": "s-stream", "x-llm-gateway-user": "u-1"},
    )
    chunks = [chunk async for chunk in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "[a] hello there"
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    (row,) = await served.rows()
    assert (row["status"], row["user_id"], row["session_id"]) == ("success", "u-1", "s-stream")
    assert chunks[0].id == f"chatcmpl-{row['request_id'].hex}"  # as a non-streamed answer's

    # The bytes: every event is "data: {json}\n\n", the last "data: [DONE]\n\n".
    async with httpx.AsyncClient() as http:
        raw = await http.post(
            f"{served.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {served.key}"},
            json={"model": "gpt-4o-mini", "messages": MSG, "stream": True},
        )
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-llm-gateway-provider"] == "openai"
    events = raw.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    for event in events[:-2]:
        assert event.startswith("data: {")
        assert json.loads(event.removeprefix("data: "))["object"] == "chat.completion.chunk"
    # Without include_usage no chunk carries usage.
    assert all("usage" not in json.loads(e[6:]) for e in events[:-2])


async def test_tools_pass_through_streamed_and_not(served: Served) -> None:
    client = served.client()
    answer = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MSG, tools=[WEATHER_TOOL], tool_choice="auto"
    )
    (choice,) = answer.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "hello there"}
    assert served.sim.requests[-1].body["tools"] == [WEATHER_TOOL]

    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MSG, tools=[WEATHER_TOOL], stream=True
    )
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    finish = None
    async for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.function and delta.function.name:
                names[delta.index] = delta.function.name
            arguments[delta.index] = arguments.get(delta.index, "") + (
                (delta.function.arguments or "") if delta.function else ""
            )
        finish = chunk.choices[0].finish_reason or finish
    assert names == {0: "get_weather"}
    assert json.loads(arguments[0]) == {"city": "hello there"}
    assert finish == "tool_calls"


# --- models and health -----------------------------------------------------------------------


async def test_models_lists_the_tenants_models_and_groups_filtered_by_key(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    groups = {"model_groups": {"smart": [{"provider": "openai", "model": "gpt-4o"}]}}
    async with gateway(pg_dsn, pg, tmp_path, inference_config=groups) as served:
        listed = await served.client().models.list()
        ids = [m.id for m in listed.data]
        assert "gpt-4o-mini" in ids and "gpt-4o" in ids and "smart" in ids
        assert len(ids) == len(set(ids))
        assert {m.owned_by for m in listed.data if m.id == "smart"} == {"llm-gateway"}

        narrow, _ = await served.keys.create(served.tenant, models=["smart"])
        assert [m.id for m in (await served.client(narrow).models.list()).data] == ["smart"]
        # The group routes for a key that may use it; another model is refused (403).
        answer = await served.client(narrow).chat.completions.create(model="smart", messages=MSG)
        assert answer.model == "gpt-4o"
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await served.client(narrow).chat.completions.create(model="gpt-4o-mini", messages=MSG)
        assert error_of(refused.value)["code"] == "model_not_allowed"


async def test_liveness_readiness_and_unknown_paths(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    async with TcpProxy(pg_dsn) as proxy:
        async with gateway(pg_dsn, pg, tmp_path, pool_dsn=proxy.dsn) as served:
            async with httpx.AsyncClient(base_url=served.url) as http:
                assert (await http.get("/health/liveness")).json() == {"status": "ok"}
                ready = await http.get("/health/readiness")
                assert ready.status_code == 200, ready.text
                assert ready.json()["providers"]["usable"] == ["openai"]

                await proxy.cut()  # PostgreSQL unreachable for the gateway's pool
                down = await http.get("/health/readiness")
                assert down.status_code == 503
                assert down.json()["status"] == "not_ready"
                assert down.json()["database"].startswith("unavailable")
                assert (await http.get("/health/liveness")).status_code == 200
                proxy.restore()

                missing = await http.get("/v1/nothing")
                assert missing.status_code == 404
                assert set(missing.json()["error"]) == ERROR_FIELDS


async def test_readiness_without_a_usable_provider(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    router = TenantLLMRouter(pg_dsn, providers={}, record_usage=False)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    keys = VirtualKeyStore(pool)
    try:
        async with serving(create_app(router, keys, pool=pool)) as url:
            async with httpx.AsyncClient() as http:
                ready = await http.get(f"{url}/health/readiness")
        assert ready.status_code == 503
        assert ready.json()["providers"] == {"configured": [], "usable": []}
        assert ready.json()["database"] == "ok"
    finally:
        await router.close()
        await keys.close()
        await pool.close()


# --- errors ----------------------------------------------------------------------------------


async def test_bad_missing_and_revoked_keys_are_401(served: Served) -> None:
    with pytest.raises(openai.AuthenticationError) as bad:
        await served.client("lgw-not-a-key").chat.completions.create(
            model="gpt-4o-mini", messages=MSG
        )
    assert error_of(bad.value)["code"] == "invalid_api_key"
    async with httpx.AsyncClient() as http:
        missing = await http.post(f"{served.url}/v1/chat/completions", json={})
    assert missing.status_code == 401 and set(missing.json()["error"]) == ERROR_FIELDS

    raw, record = await served.keys.create(served.tenant, name="short-lived")
    client = served.client(raw)
    assert (await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)).choices
    assert await served.keys.revoke(record.id)
    with pytest.raises(openai.AuthenticationError) as revoked:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    error = error_of(revoked.value)
    assert "revoked" in error["message"] and raw not in revoked.value.response.text
    with pytest.raises(openai.AuthenticationError):
        await client.models.list()


async def test_quota_refusal_is_429_with_retry_after(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    config = {"limits": {"requests_per_minute": 1}}
    async with gateway(pg_dsn, pg, tmp_path, inference_config=config) as served:
        client = served.client()
        await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
        error = error_of(refused.value)
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        retry_after = int(refused.value.response.headers["retry-after"])
        assert 1 <= retry_after <= 61  # the window of a minute, rounded up
        assert len(served.sim.requests) == 1  # refused before any provider was called

        # A key's own limits (per-key quota): its second request in the minute is refused.
        other = await make_tenant(pg)
        raw, _ = await served.keys.create(other, limits={"requests_per_minute": 1})
        await served.client(raw).chat.completions.create(model="gpt-4o-mini", messages=MSG)
        with pytest.raises(openai.RateLimitError) as by_key:
            await served.client(raw).chat.completions.create(model="gpt-4o-mini", messages=MSG)
        assert error_of(by_key.value)["message"].startswith("key quota exceeded")
        assert "retry-after" in by_key.value.response.headers


async def test_every_provider_rate_limited_is_429_with_their_retry_after(served: Served) -> None:
    # Every attempt answered 429 (Retry-After 2.5 s): the caller is told to back off, with
    # the provider's own wait (rounded up to whole seconds, exact in retry-after-ms).
    served.sim.fail_with = "429"
    served.sim.retry_after = 2.5
    with pytest.raises(openai.RateLimitError) as limited:
        await served.client().chat.completions.create(model="gpt-4o-mini", messages=MSG)
    error = error_of(limited.value)
    assert (error["type"], error["code"]) == ("rate_limit_error", "upstream_rate_limited")
    headers = limited.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("3", "2500")
    rows = await served.rows()
    assert rows and {r["status"] for r in rows} == {"rate_limit"}


def test_a_mix_of_429_and_other_failures_stays_502() -> None:
    def attempt(outcome: str, retry_after: float | None) -> Attempt:
        return Attempt("p", "m", "system", outcome, 0.1, uuid.uuid4(), retry_after=retry_after)

    limited = AllProvidersFailedError("t", [attempt("rate_limit", 4.0), attempt("rate_limit", 2)])
    assert (api_error(limited).status, api_error(limited).headers["retry-after"]) == (429, "2")
    mixed = AllProvidersFailedError("t", [attempt("rate_limit", 2.0), attempt("error", None)])
    assert api_error(mixed).status == 502 and "retry-after" not in api_error(mixed).headers
    assert api_error(AllProvidersFailedError("t", [])).status == 502


async def test_request_and_provider_errors_map_to_openai_statuses(served: Served) -> None:
    client = served.client()
    # A provider's 400 is the caller's: its message reaches them.
    served.sim.script("400")
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert "'messages' is malformed" in error_of(bad.value)["message"]

    # The provider fails every attempt: 502.
    served.sim.fail_with = "500"
    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert failed.value.status_code == 502
    assert error_of(failed.value)["code"] == "all_providers_failed"
    served.sim.fail_with = None

    # A model no provider of the tenant serves: 404 model_not_found, as OpenAI answers.
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(model="no-such-model", messages=MSG)
    assert error_of(unknown.value)["param"] == "model"

    # A router argument in the body is refused, not passed on or applied.
    with pytest.raises(openai.BadRequestError) as clash:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=MSG, extra_body={"timeout": 0.001}
        )
    assert error_of(clash.value)["param"] == "timeout"

    # An invalid session label (the SDK's rule) is a 400 naming the field.
    with pytest.raises(openai.BadRequestError) as label:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=MSG, extra_headers={"x-llm-gateway-session": "a b"}
        )
    assert error_of(label.value)["param"] == "session_id"

    async with httpx.AsyncClient() as http:
        auth = {"authorization": f"Bearer {served.key}"}
        for body, param in ((b"{not json", None), (b'{"model": "gpt-4o-mini"}', "messages")):
            answer = await http.post(
                f"{served.url}/v1/chat/completions", headers=auth, content=body
            )
            assert answer.status_code == 400
            assert answer.json()["error"]["param"] == param
    assert len([r for r in await served.rows() if r["status"] == "success"]) == 0


async def test_a_body_over_the_limit_is_413_before_it_is_read_whole(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    async with gateway(pg_dsn, pg, tmp_path, app_kwargs={"max_body_bytes": 1000}) as served:
        big = "x" * 2000
        with pytest.raises(openai.APIStatusError) as declared:
            await served.client().chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": big}]
            )
        assert declared.value.status_code == 413
        assert error_of(declared.value)["code"] == "request_too_large"

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as read
            yield b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"y" * 100
            yield b'"}]}'

        async with httpx.AsyncClient() as http:
            answer = await http.post(
                f"{served.url}/v1/chat/completions",
                headers={"authorization": f"Bearer {served.key}"},
                content=chunked(),
            )
            assert answer.status_code == 413
            assert answer.json()["error"]["code"] == "request_too_large"
            # A body under the limit is served.
            small = await served.client().chat.completions.create(model="gpt-4o-mini", messages=MSG)
            assert small.choices[0].message.content
        assert served.sim.requests == [served.sim.requests[0]]  # only the small one went out


async def test_no_provider_is_503_and_deadline_is_504(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    async with gateway(pg_dsn, pg, tmp_path, timeout=1.0) as served:
        served.sim.script(Behaviour("ok", latency_ms=10_000))
        with pytest.raises(openai.APIStatusError) as late:
            await served.client().chat.completions.create(model="gpt-4o-mini", messages=MSG)
        assert late.value.status_code == 504
        assert error_of(late.value)["code"] == "deadline_exceeded"

        closed = await make_tenant(pg, inference_config={"use_system_keys": False})
        raw, _ = await served.keys.create(closed)
        with pytest.raises(openai.APIStatusError) as none:
            await served.client(raw).chat.completions.create(model="gpt-4o-mini", messages=MSG)
        assert none.value.status_code == 503
        assert error_of(none.value)["code"] == "no_provider_available"


async def test_failure_after_content_is_an_error_event(served: Served) -> None:
    served.sim.script(Behaviour("stream_error_after_first", chunks_before_error=2))
    stream = await served.client().chat.completions.create(
        model="gpt-4o-mini", messages=MSG, stream=True
    )
    received = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received)  # content arrived before the error
    (row,) = await served.rows()
    assert row["status"] != "success"


# --- packaging -------------------------------------------------------------------------------


def test_import_llm_gateway_does_not_import_the_server_framework() -> None:
    code = (
        "import sys, llm_gateway, llm_gateway.server, llm_gateway.server.virtual_keys;"
        "from llm_gateway.cli import _parser; _parser();"
        "bad = [m for m in ('starlette', 'uvicorn') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_metrics_serve_the_prometheus_registry(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    prometheus = pytest.importorskip("prometheus_client", reason="the metrics extra is absent")
    registry = prometheus.CollectorRegistry()
    served_total = prometheus.Counter("gateway_test_total", "a test counter", registry=registry)
    served_total.inc(3)
    router = TenantLLMRouter(pg_dsn, providers={}, record_usage=False)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    keys = VirtualKeyStore(pool)
    try:
        app = create_app(router, keys, pool=pool, metrics_registry=registry)
        async with serving(app) as url, httpx.AsyncClient() as http:
            answer = await http.get(f"{url}/metrics")
    finally:
        await router.close()
        await keys.close()
        await pool.close()
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert "gateway_test_total 3.0" in answer.text
