"""Streaming through the router: failover before the first chunk, typed errors after it."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from llm_gateway import MidStreamError, TenantLLMRouter, provider_settings
from llm_gateway.simulator import Behaviour, SimulatedProvider
from tests.conftest import make_tenant

MSG = [{"role": "user", "content": "tell me a story"}]


@pytest.fixture
async def two() -> AsyncIterator[tuple[SimulatedProvider, SimulatedProvider]]:
    first = SimulatedProvider(name="first", flavor="groq", chunks=4)
    second = SimulatedProvider(name="second", chunks=4)
    async with first, second:
        yield first, second


def providers(first: SimulatedProvider, second: SimulatedProvider, **options: int) -> dict:  # type: ignore[type-arg]
    return {
        "groq": provider_settings("groq", first.root_url, api_key="sys-groq", **options),
        "llm7": provider_settings("llm7", second.base_url, api_key="sys-llm7", **options),
    }


async def tenant(pg: asyncpg.Connection) -> uuid.UUID:
    return await make_tenant(
        pg, inference_config={"preferred_provider": "groq", "fallback_order": ["llm7"]}
    )


async def rows(pg: asyncpg.Connection, t: uuid.UUID) -> list[dict]:  # type: ignore[type-arg]
    found = await pg.fetch(
        "SELECT * FROM model_usage_stats WHERE tenant_id = $1 ORDER BY timestamp, attempt", t
    )
    return [{**r, "metadata": json.loads(r["metadata"])} for r in found]


async def until_closed(sim: SimulatedProvider) -> int:
    """The server notices a client's close one loop turn later: wait for it (bounded)."""
    for _ in range(100):
        if sim.open_connections == 0:
            break
        await asyncio.sleep(0.02)
    return sim.open_connections


async def test_stream_success_reads_usage(pg_dsn: str, pg: asyncpg.Connection, two) -> None:  # type: ignore[no-untyped-def]
    first, second = two
    t = await tenant(pg)
    async with TenantLLMRouter(pg_dsn, providers=providers(first, second)) as router:
        stream = await router.stream_for_tenant(t, MSG)
        async with stream:
            chunks = [c async for c in stream]
        result = stream.result
    assert "".join(c.content for c in chunks) == "[first] tell me a story"
    assert result is not None and result.provider == "groq"
    # Groq flavour: usage arrives in x_groq.usage of the last chunk.
    assert result.tokens_input is not None and result.tokens_output is not None
    body = first.requests[0].body
    assert body is not None and body["stream"] is True
    assert "stream_options" not in body  # the groq SDK has none; Groq always sends x_groq.usage
    [row] = await rows(pg, t)
    assert row["status"] == "success"
    assert (row["input_tokens"], row["output_tokens"]) == (
        result.tokens_input,
        result.tokens_output,
    )
    assert row["metadata"]["stream"] is True and "tokens_estimated" not in row["metadata"]


@pytest.mark.parametrize(
    "failure",
    ["stream_error_first", "groq_error_event", "stream_empty", "malformed", "html", "503"],
)
async def test_failure_before_first_chunk_fails_over(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two, failure: str
) -> None:
    first, second = two
    first.fail_with = failure
    t = await tenant(pg)
    async with TenantLLMRouter(pg_dsn, providers=providers(first, second)) as router:
        async with await router.stream_for_tenant(t, MSG) as stream:
            text = "".join([c.content async for c in stream])
    assert text == "[second] tell me a story"
    assert [a.provider for a in stream.result.attempts] == ["groq", "llm7"]  # type: ignore[union-attr]
    llm7_body = second.requests[0].body
    assert llm7_body is not None and llm7_body["stream_options"] == {"include_usage": True}
    # A stream with nothing in it is an empty answer, like an empty completion.
    status = "empty_response" if failure == "stream_empty" else "error"
    assert [(r["provider"], r["status"]) for r in await rows(pg, t)] == [
        ("groq", status),
        ("llm7", "success"),
    ]


async def test_error_after_first_chunk_is_typed_not_failed_over(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two
) -> None:
    first, second = two
    first.fail_with = "stream_error_after_first"
    t = await tenant(pg)
    received: list[str] = []
    async with TenantLLMRouter(pg_dsn, providers=providers(first, second)) as router:
        stream = await router.stream_for_tenant(t, MSG)
        with pytest.raises(MidStreamError) as info:
            async with stream:
                async for chunk in stream:
                    received.append(chunk.content)
    assert received and info.value.partial_content == "".join(received)
    assert second.requests == []
    [row] = await rows(pg, t)
    assert (
        row["status"] == "error" and row["output_tokens"] is not None and row["output_tokens"] > 0
    )
    assert row["metadata"]["tokens_estimated"] is True


async def test_stall_before_first_token_fails_over_within_ttft(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two
) -> None:
    first, second = two
    first.fail_with = "stall_before_first"
    t = await tenant(pg)
    async with (
        TenantLLMRouter(pg_dsn, providers=providers(first, second), ttft_timeout=2.0) as router,
        await router.stream_for_tenant(t, MSG) as stream,
    ):
        text = "".join([c.content async for c in stream])
    assert text.startswith("[second]")
    assert [r["status"] for r in await rows(pg, t)] == ["timeout", "success"]


async def test_stall_after_first_chunk_then_no_pool_exhaustion(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two
) -> None:
    first, second = two
    t = await tenant(pg)
    settings = providers(first, second, max_connections=3, max_keepalive=3)
    async with TenantLLMRouter(pg_dsn, providers=settings, chunk_timeout=2.0) as router:
        first.fail_with = "stall_after_first"
        for _ in range(3):
            stream = await router.stream_for_tenant(t, MSG)
            with pytest.raises(MidStreamError) as info:
                async with stream:
                    async for _chunk in stream:
                        pass
            assert info.value.cause == "ProviderTimeoutError"
        first.fail_with = None

        async def one() -> str:
            async with await router.stream_for_tenant(t, MSG) as s:
                return "".join([c.content async for c in s])

        # Three times the pool size at once: a connection leaked by the stalls would block.
        texts = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(9))), timeout=10)
    assert texts == ["[first] tell me a story"] * 9
    statuses = [r["status"] for r in await rows(pg, t)]
    assert statuses.count("timeout") == 3 and statuses.count("success") == 9


async def test_cancelled_streams_write_cancelled_rows(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = two
    first.script(*[Behaviour(chunks=8, chunk_delay_ms=30) for _ in range(100)])
    t = await tenant(pg)
    two_chunks = asyncio.Event()
    seen = 0

    async def consume(router: TenantLLMRouter) -> None:
        nonlocal seen
        async with await router.stream_for_tenant(t, MSG) as stream:
            n = 0
            async for _chunk in stream:
                n += 1
                if n == 2:
                    seen += 1
                    if seen == 100:
                        two_chunks.set()
                    await asyncio.sleep(30)

    caplog.set_level(logging.WARNING)
    settings = providers(first, second, max_keepalive=20)
    async with TenantLLMRouter(pg_dsn, providers=settings) as router:
        tasks = [asyncio.create_task(consume(router)) for _ in range(100)]
        await asyncio.wait_for(two_chunks.wait(), timeout=20)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        gc.collect()
        # Returned to the pool: at most its 20 keep-alive connections stay open, not 100.
        for _ in range(100):
            if first.open_connections <= 20:
                break
            await asyncio.sleep(0.02)
        assert first.open_connections <= 20
    assert await until_closed(first) == 0
    result = await rows(pg, t)
    assert len(result) == 100
    assert {r["status"] for r in result} == {"cancelled"}
    assert all(r["output_tokens"] and r["metadata"]["tokens_estimated"] for r in result)
    assert "Task was destroyed" not in caplog.text


async def test_finished_streams_reuse_their_connection(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two
) -> None:
    first, second = two
    t = await tenant(pg)
    async with TenantLLMRouter(pg_dsn, providers=providers(first, second)) as router:
        for _ in range(10):
            async with await router.stream_for_tenant(t, MSG) as stream:
                assert "".join([c.content async for c in stream]).startswith("[first]")
    assert first.connections_accepted == 1
