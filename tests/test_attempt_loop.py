"""The one attempt loop: reserved parameters, per-attempt breaker checks, unexpected errors,
stream timeouts, cancellation, the 429 wait for streams, metadata namespacing and close().

Real PostgreSQL, simulated providers over loopback HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from llm_gateway import (
    AllProvidersFailedError,
    DatabaseError,
    GatewayError,
    InvalidRequestError,
    MidStreamError,
    TenantLLMRouter,
    provider_settings,
)
from llm_gateway.health import HealthRegistry
from llm_gateway.simulator import Behaviour
from tests.conftest import make_tenant
from tests.two_providers import prefer_groq, rows, settings

MSG = [{"role": "user", "content": "hello"}]


# --- item 2: reserved parameters never reach a provider, a breaker or the table -------------


@pytest.mark.parametrize(
    "param",
    ["extra_headers", "extra_query", "extra_body", "model", "stream"],
)
@pytest.mark.parametrize("streamed", [False, True])
async def test_reserved_parameter_is_rejected_up_front(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims, param: str, streamed: bool
) -> None:
    a, b = two_sims
    t = await prefer_groq(pg)
    async with TenantLLMRouter(pg_dsn, providers=settings(a, b)) as router:
        for _ in range(6):  # more than the breaker's threshold of 5
            with pytest.raises(InvalidRequestError) as info:
                if streamed:
                    await router.stream_for_tenant(t, MSG, **{param: {"x": "1"}})
                else:
                    await router.complete_for_tenant(t, MSG, **{param: {"x": "1"}})
            assert info.value.parameter == param
            assert param in str(info.value)
        assert router.health() == []  # no breaker, no failure counted
        # The system key still serves everyone.
        assert (await router.complete_for_tenant(t, MSG)).provider == "groq"
    assert len(a.requests) == 1 and b.requests == []
    assert [r["status"] for r in await rows(pg, t)] == ["success"]


async def test_unserialisable_stream_param_is_a_caller_error(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    t = await prefer_groq(pg)
    async with TenantLLMRouter(pg_dsn, providers=settings(a, b)) as router:
        for _ in range(6):
            with pytest.raises(InvalidRequestError):
                await router.stream_for_tenant(t, MSG, temperature=object())
        assert {(h["state"], h["failures"]) for h in router.health()} == {("closed", 0)}
    assert a.requests == [] and b.requests == []
    assert await rows(pg, t) == []


# --- item 10: the breaker is checked right before each attempt -----------------------------


async def test_half_open_key_gets_exactly_one_probe_under_concurrency(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    t = await prefer_groq(pg)
    health = HealthRegistry()
    async with TenantLLMRouter(pg_dsn, providers=settings(a, b), health=health) as router:
        # llm7's breaker has cooled down: half-open, the next attempt is its one probe.
        health.get("llm7", router.key_fingerprint("sys-b")).half_open = True
        # groq fails slowly for everyone; the llm7 probe then takes long, so every other
        # request reaches llm7 while the probe is in flight.
        a.fail_with = Behaviour("503", latency_ms=300)
        b.script(Behaviour("ok", latency_ms=3000))
        outcomes = await asyncio.gather(
            *(router.complete_for_tenant(t, MSG, timeout=30) for _ in range(10)),
            return_exceptions=True,
        )
    assert len(a.requests) == 10
    assert len(b.requests) == 1, "more than one probe reached the half-open key"
    served = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(served) == 1 and served[0].provider == "llm7"
    failed = [o for o in outcomes if isinstance(o, AllProvidersFailedError)]
    assert len(failed) == 9
    # A skipped entry is not an attempt: no row for it.
    assert all([x.provider for x in f.attempts] == ["groq"] for f in failed)
    statuses = [(r["provider"], r["status"]) for r in await rows(pg, t)]
    assert [s for s in statuses if s[0] == "llm7"] == [("llm7", "success")]


# --- item 6: an unexpected exception records the row and frees the probe -------------------


async def test_unexpected_exception_records_row_and_frees_probe(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    from llm_gateway.attempts import run_attempts
    from llm_gateway.chain import ChainEntry
    from llm_gateway.keys import ApiKey, Fingerprinter
    from llm_gateway.ledger import RequestLedger
    from llm_gateway.providers import create_provider
    from llm_gateway.types import TaskType
    from usage import ModelUsageTracker
    from usage.pricing import default_price_book

    a, b = two_sims
    t = await make_tenant(pg)
    provider = create_provider(settings(a, b)["llm7"])
    key = ApiKey("sys-b", "system")
    fingerprint = Fingerprinter(b"test-deployment")(key)
    entry = ChainEntry("llm7", "gpt-4o-mini", key, "system", fingerprint, None, None)
    health = HealthRegistry()
    state = health.get("llm7", fingerprint)
    state.half_open = True  # the next attempt is the probe

    class Buggy:
        """Reaches the provider for real, then fails the way a bug in our code would."""

        cap = None
        what = "an answer"

        def begin(self, entry: ChainEntry) -> None:
            pass

        async def run(self, entry: ChainEntry, timeout: float) -> object:
            await provider.complete(
                key=entry.key, model=entry.model, messages=MSG, params={}, timeout=timeout
            )
            raise RuntimeError("bug after the call")

        def row(self, cancelled: bool) -> dict[str, Any]:
            return {}

        async def release(self) -> None:
            pass

        def succeed(self, *args: Any) -> object:
            raise AssertionError("not reached")

    tracker = ModelUsageTracker(pg_dsn)
    await tracker.start()
    try:
        ledger = RequestLedger(t, tracker, default_price_book(), "/t", None, TaskType.CHAT, None)

        async def replan() -> list[ChainEntry]:
            return []

        with pytest.raises(RuntimeError, match="bug after the call"):
            await run_attempts(
                Buggy(),
                [entry],
                ledger=ledger,
                health=health,
                deadline=time.monotonic() + 30,
                budget=30,
                replan=replan,
            )
        await tracker.flush()
    finally:
        await tracker.close()
        await provider.aclose()
    assert len(b.requests) == 1
    assert not state.probe_in_flight  # the probe is released for the next request
    assert state.failures == 0 and state.consecutive_failures == 0  # not a provider failure
    [row] = await rows(pg, t)
    assert row["status"] == "error" and "RuntimeError" in row["error_message"]
    assert "bug after the call" not in row["error_message"]  # only the class, never its text


# --- item 12: the per-chunk read timeout is not the time left at opening --------------------


async def test_stream_opened_late_keeps_its_chunk_timeout(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    t = await prefer_groq(pg)
    # groq fails after 4 s of a 5.5 s deadline, so llm7's stream opens with ~1.5 s left; it
    # sends its first content at once, then stalls.
    a.script(Behaviour("503", latency_ms=4000))
    b.fail_with = "stall_after_first"
    async with TenantLLMRouter(pg_dsn, providers=settings(a, b), chunk_timeout=6.0) as router:
        stream = await router.stream_for_tenant(t, MSG, timeout=5.5)
        async with stream:
            first = await anext(stream)
            got_first = time.monotonic()
            with pytest.raises(MidStreamError) as info:
                async for _ in stream:
                    pass
            waited = time.monotonic() - got_first
    assert first.content and info.value.cause == "ProviderTimeoutError"
    # The stall is given chunk_timeout (6 s), not the ~1.5 s the deadline had left at opening.
    assert waited >= 4.0
    assert [r["status"] for r in await rows(pg, t)] == ["error", "timeout"]


# --- item 13: a second cancellation while opening does not lose the row ---------------------


async def test_cancel_twice_while_opening_keeps_the_row(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    t = await prefer_groq(pg)
    a.fail_with = "stall_before_first"
    async with TenantLLMRouter(pg_dsn, providers=settings(a, b)) as router:
        task = asyncio.create_task(router.stream_for_tenant(t, MSG))
        for _ in range(500):
            if a.requests and a.open_connections:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the headers arrived; now waiting for the first chunk
        task.cancel()
        for _ in range(20):  # again and again while the cancelled attempt is being closed
            await asyncio.sleep(0)
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [r["status"] for r in await rows(pg, t)] == ["cancelled"]


# --- item 21: the 429 wait-once applies to streams too --------------------------------------


async def test_stream_waits_out_a_short_retry_after(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    t = await make_tenant(pg, inference_config={"preferred_provider": "groq"})
    providers = {"groq": settings(a, b)["groq"]}
    a.retry_after = 0.3
    a.script("429")
    async with (
        TenantLLMRouter(pg_dsn, providers=providers) as router,
        await router.stream_for_tenant(t, MSG) as stream,
    ):
        text = "".join([c.content async for c in stream])
    assert text == "[a] hello"
    assert stream.result is not None
    assert [x.outcome for x in stream.result.attempts] == ["rate_limit", "success"]
    assert [r["status"] for r in await rows(pg, t)] == ["rate_limit", "success"]


# --- item 5: caller metadata cannot overwrite the SDK's fields ------------------------------


async def test_caller_metadata_is_namespaced(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    t = await prefer_groq(pg)
    caller = {"key_fp": "x", "task_type": "y", "stream": False, "feature": "bot"}
    async with TenantLLMRouter(pg_dsn, providers=settings(a, b)) as router:
        await router.complete_for_tenant(t, MSG, metadata=caller)
        async with await router.stream_for_tenant(t, MSG, metadata=caller) as stream:
            async for _ in stream:
                pass
        fingerprint = router.key_fingerprint("sys-a")
    plain, streamed = await rows(pg, t)
    for row in (plain, streamed):
        meta = row["metadata"]
        assert (meta["key_fp"], meta["task_type"]) == (fingerprint, "chat")
        assert meta["caller"] == caller
    assert streamed["metadata"]["stream"] is True


# --- item 17: close() lets in-flight requests finish, refuses new ones ----------------------


async def test_close_waits_for_in_flight_requests(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims
) -> None:
    a, b = two_sims
    t = await prefer_groq(pg)
    a.latency_ms = 1500
    router = TenantLLMRouter(pg_dsn, providers=settings(a, b))
    await router.start()
    slow = asyncio.create_task(router.complete_for_tenant(t, MSG))
    for _ in range(500):
        if a.requests:
            break
        await asyncio.sleep(0.01)
    closing = asyncio.create_task(router.close(timeout=30))
    await asyncio.sleep(0)
    with pytest.raises(GatewayError, match="closing"):
        await router.complete_for_tenant(t, MSG)
    await closing
    result = await slow
    assert result.provider == "groq"
    assert [(r["id"], r["status"]) for r in await rows(pg, t)] == [(result.usage_id, "success")]


# --- item 11: connect timeouts --------------------------------------------------------------


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


async def test_router_pool_connect_is_bounded(silent_listener: int) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{silent_listener}/none"
    router = TenantLLMRouter(dsn, providers={}, record_usage=False, connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(DatabaseError):
        await router.start()
    assert time.monotonic() - started < 20  # asyncpg's own default is 60 s


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A loopback port whose accept queue is full: a new connection's SYN goes unanswered."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(8):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    try:
        yield port
    finally:
        for c in fillers:
            c.close()
        server.close()


async def test_provider_connect_timeout_applies_under_a_long_deadline(  # type: ignore[no-untyped-def]
    pg_dsn: str, pg: asyncpg.Connection, two_sims, full_backlog: int
) -> None:
    _, b = two_sims
    t = await prefer_groq(pg)
    providers = {
        "groq": provider_settings(
            "groq", f"http://127.0.0.1:{full_backlog}", api_key="k", connect_timeout=1.0
        ),
        "llm7": provider_settings("llm7", b.base_url, api_key="sys-b"),
    }
    async with TenantLLMRouter(pg_dsn, providers=providers) as router:
        started = time.monotonic()
        result = await router.complete_for_tenant(t, MSG, timeout=40)
        elapsed = time.monotonic() - started
    assert result.provider == "llm7"
    assert result.attempts[0].outcome == "timeout"
    assert elapsed < 20  # connect_timeout (1 s), not the 40 s deadline
