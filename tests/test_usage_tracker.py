"""ModelUsageTracker against real PostgreSQL: batching, retries, pricing, stats, rate limits."""

from __future__ import annotations

import asyncio
import gc
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import usage.writer
from llm_gateway.errors import InvalidTenantConfigError
from tests.conftest import make_tenant
from usage import (
    ModelUsageTracker,
    RateLimits,
    UsageRecord,
    close_usage_tracker,
    get_usage_tracker,
    new_usage_id,
    track_usage,
)


def make_row(tenant: uuid.UUID, i: int = 0, **overrides: Any) -> UsageRecord:
    fields: dict[str, Any] = {
        "id": new_usage_id(),
        "tenant_id": tenant,
        "user_id": "u1",
        "provider": "groq",
        "model_name": "llama-3.3-70b-versatile",
        "endpoint": "/api/chat",
        "input_tokens": 10,
        "output_tokens": 20,
        "latency_ms": 100 + i,
        "estimated_cost_usd": Decimal("0.000022"),
        "status": "success",
        "error_message": None,
        "metadata": {"i": i},
        "timestamp": datetime.now(UTC),
        "input_price_per_m": Decimal("0.59"),
        "output_price_per_m": Decimal("0.79"),
        "price_known": True,
    }
    fields.update(overrides)
    return UsageRecord(**fields)


def closed_port_dsn() -> str:
    """A DSN (with a password, to check it is never reported) to a port nothing listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"postgresql://postgres:s3cret@127.0.0.1:{port}/nowhere"


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition, polling; fails the test when it does not hold in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def count_rows(pg: asyncpg.Connection, tenant: uuid.UUID) -> tuple[int, int]:
    row = await pg.fetchrow(
        "SELECT count(*) AS n, count(DISTINCT id) AS d FROM model_usage_stats WHERE tenant_id = $1",
        tenant,
    )
    assert row is not None
    return row["n"], row["d"]


def tracker_for(dsn: str, spool: Path, **kwargs: Any) -> ModelUsageTracker:
    options: dict[str, Any] = {
        "spool_dir": spool,
        "flush_interval": 0.05,
        "grace_period": 0.2,
        "max_backoff": 0.2,
        "connect_timeout": 1.0,
    }
    options.update(kwargs)
    return ModelUsageTracker(dsn, **options)


async def test_record_then_close_writes_exactly_500(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    tenant = uuid.uuid4()
    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()
    for i in range(500):
        tracker.record(make_row(tenant, i))
    backlog = await tracker.close()
    assert await count_rows(pg, tenant) == (500, 500)
    assert (backlog.queued, backlog.written_rows, backlog.spooled_total) == (0, 500, 0)
    assert backlog.failed_batches == 0
    assert await tracker.close() == backlog  # idempotent


async def test_close_while_gc_collects_in_a_loop_writes_all_500(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    tenant = uuid.uuid4()
    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()
    for i in range(500):
        tracker.record(make_row(tenant, i))
    stop = asyncio.Event()

    async def collect() -> int:
        rounds = 0
        while not stop.is_set():
            gc.collect()
            rounds += 1
            await asyncio.sleep(0)
        return rounds

    collector = asyncio.create_task(collect())
    backlog = await tracker.close()
    stop.set()
    assert await collector > 0  # the collector really ran while close() drained
    assert await count_rows(pg, tenant) == (500, 500)
    assert backlog.written_rows == 500 and backlog.queued == 0


async def test_track_request_stores_cost_and_prices_charged(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    tenant = uuid.uuid4()
    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()
    common: dict[str, Any] = {"tenant_id": str(tenant), "endpoint": "/api/chat", "latency_ms": 12.6}
    known = await tracker.track_request(
        provider="openai",
        model_name="gpt-4o",
        input_tokens=1000,
        output_tokens=100,
        cached_input_tokens=400,
        **common,
    )
    unknown = await tracker.track_request(
        provider="groq", model_name="no-such-model", input_tokens=5, output_tokens=5, **common
    )
    failed = await tracker.track_request(
        provider="local", model_name="llama3", status="error", error_message="boom", **common
    )
    assert await tracker.flush(timeout=5)
    rows = {
        r["id"]: r
        for r in await pg.fetch("SELECT * FROM model_usage_stats WHERE tenant_id = $1", tenant)
    }
    assert rows[known]["estimated_cost_usd"] == Decimal("0.003000")
    assert rows[known]["input_price_per_m"] == Decimal("2.5")
    assert rows[known]["output_price_per_m"] == Decimal("10")
    assert rows[known]["price_known"] is True
    assert rows[known]["latency_ms"] == 13
    assert rows[known]["total_tokens"] == 1100
    assert '"cached_input_tokens": 400' in rows[known]["metadata"]
    assert rows[unknown]["estimated_cost_usd"] is None
    assert rows[unknown]["price_known"] is False
    assert rows[unknown]["input_price_per_m"] is None
    assert rows[failed]["estimated_cost_usd"] is None  # no token counts
    assert rows[failed]["price_known"] is True and rows[failed]["input_price_per_m"] == 0
    assert rows[failed]["error_message"] == "boom"
    await tracker.close()


async def test_batch_failing_once_is_retried_and_lands_once(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """The writer's backend is killed while its COPY waits on a lock: one retry, no duplicate."""
    tenant = uuid.uuid4()
    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()
    for i in range(100):
        tracker.record(make_row(tenant, i))
    assert await tracker.flush(timeout=5)
    blocker = await asyncpg.connect(pg_dsn)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE model_usage_stats IN SHARE MODE")  # blocks inserts
        for i in range(200):
            tracker.record(make_row(tenant, 100 + i))
        pid = None
        for _ in range(500):
            pid = await pg.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'llm_gateway.usage' AND wait_event_type = 'Lock'"
                # The writer's COPY, not maintenance (whose DDL waits on the lock too).
                " AND query ILIKE 'COPY%'"
            )
            if pid is not None:
                break
            await asyncio.sleep(0.01)
        assert pid is not None, "the writer never blocked on the lock"
        assert await pg.fetchval("SELECT pg_terminate_backend($1)", pid)
        await tx.rollback()
    finally:
        await blocker.close()
    assert await tracker.flush(timeout=5)
    backlog = await tracker.close()
    assert await count_rows(pg, tenant) == (300, 300)
    assert backlog.failed_batches == 1
    assert backlog.written_rows == 300 and backlog.duplicate_rows == 0
    assert backlog.last_error is not None


async def test_commit_whose_ack_is_lost_is_not_written_twice(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COPY commits, then the connection drops before the answer: the retry is idempotent."""
    real_copy = usage.writer.copy_rows
    calls = 0

    async def copy_then_lose_ack(conn: Any, rows: Any, *, timeout: float | None) -> int:
        nonlocal calls
        calls += 1
        n = await real_copy(conn, rows, timeout=timeout)
        if calls == 1:
            raise ConnectionResetError("connection lost after commit")
        return n

    monkeypatch.setattr(usage.writer, "copy_rows", copy_then_lose_ack)
    tenant = uuid.uuid4()
    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()
    for i in range(150):
        tracker.record(make_row(tenant, i))
    backlog = await tracker.close()
    assert await count_rows(pg, tenant) == (150, 150)
    assert backlog.failed_batches == 1
    assert backlog.written_rows == 150 and backlog.duplicate_rows == 150


async def test_row_postgres_refuses_is_isolated_and_kept(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    tenant = uuid.uuid4()
    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()
    for i in range(99):
        tracker.record(make_row(tenant, i))
    bad = make_row(tenant, 99, latency_ms=2**40)  # does not fit the integer column
    tracker.record(bad)
    backlog = await tracker.close()
    assert await count_rows(pg, tenant) == (99, 99)
    assert backlog.rejected_rows == 1 and backlog.written_rows == 99 and backlog.queued == 0
    rejected = list((tmp_path / "rejected").glob("rejected-*.jsonl"))
    assert len(rejected) == 1 and str(bad.id) in rejected[0].read_text()


async def test_backlog_reports_queued_spooled_and_written(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    tenant = uuid.uuid4()
    down = tracker_for(closed_port_dsn(), tmp_path)
    for i in range(300):
        down.record(make_row(tenant, i))
    assert (down.stats.queued, down.stats.spooled_rows, down.stats.written_rows) == (300, 0, 0)
    await down.start()
    assert await down.flush(timeout=5)  # durable: in the spool, since PostgreSQL is away
    stats = down.backlog()
    assert (stats.queued, stats.spooled_rows, stats.spooled_files) == (0, 300, 1)
    assert (stats.written_rows, stats.spooled_total) == (0, 300)
    assert stats.failed_batches >= 1 and not stats.database_available
    assert stats.last_error is not None and "s3cret" not in stats.last_error
    await down.close()

    up = tracker_for(pg_dsn, tmp_path)
    await up.start()  # the spool is replayed in the background
    await eventually(lambda: up.backlog().replayed_rows == 300)
    stats = up.backlog()
    assert (stats.spooled_rows, stats.spooled_files, stats.replayed_rows) == (0, 0, 300)
    assert stats.written_rows == 300 and stats.database_available
    await up.close()
    assert await count_rows(pg, tenant) == (300, 300)


async def test_tenant_usage_stats(pg_dsn: str, tmp_path: Path) -> None:
    tenant = uuid.uuid4()
    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()
    for i in range(20):  # latencies 10..200 ms
        status = "success" if i < 15 else ("rate_limit" if i < 17 else "error")
        await tracker.track_request(
            tenant_id=tenant,
            provider="groq",
            model_name="llama-3.3-70b-versatile",
            endpoint="/api/chat",
            latency_ms=10 * (i + 1),
            input_tokens=1000,
            output_tokens=2000,
            status=status,
        )
    for _ in range(5):
        await tracker.track_request(
            tenant_id=tenant,
            provider="openrouter",
            model_name="some/unknown-model",
            endpoint="/api/chat",
            latency_ms=50,
            input_tokens=1,
            output_tokens=1,
        )
    old = datetime.now(UTC) - timedelta(hours=30)  # outside the 24 h window
    tracker.record(make_row(tenant, timestamp=old))
    assert await tracker.flush(timeout=5)
    stats = await tracker.get_tenant_usage_stats(tenant, hours=24)
    assert stats.requests == 25 and stats.errors == 5 and stats.rate_limited == 2
    groq, other = stats.models
    assert (groq.provider, groq.model_name, groq.requests) == ("groq", groq.model_name, 20)
    assert (groq.input_tokens, groq.output_tokens, groq.total_tokens) == (20_000, 40_000, 60_000)
    assert groq.cost_usd == Decimal("0.043400")  # 20 x 0.002170
    assert groq.avg_latency_ms == pytest.approx(105.0)
    assert groq.p95_latency_ms == pytest.approx(190.5)  # percentile_cont over 10..200
    assert (groq.errors, groq.rate_limited, groq.unpriced_requests) == (5, 2, 0)
    assert (other.requests, other.cost_usd, other.unpriced_requests) == (5, Decimal(0), 5)
    assert stats.cost_usd == Decimal("0.043400") and stats.total_tokens == 60_010
    wider = await tracker.get_tenant_usage_stats(str(tenant), hours=48)
    assert wider.requests == 26
    await tracker.close()


async def test_rate_limit_status(pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path) -> None:
    limits = {"requests_per_minute": 10, "tokens_per_minute": 10_000, "requests_per_day": 100}
    tenant = await make_tenant(pg, inference_config={"rate_limits": {"groq": limits}})
    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()

    async def send(n: int) -> None:
        for _ in range(n):
            await tracker.track_request(
                tenant_id=tenant,
                provider="groq",
                model_name="llama-3.3-70b-versatile",
                endpoint="/api/chat",
                latency_ms=5,
                input_tokens=10,
                output_tokens=10,
            )
        assert await tracker.flush(timeout=5)

    status = await tracker.check_rate_limit_status(tenant, "groq")
    assert (status.status, status.usage_percent, status.should_failover) == ("healthy", 0, False)
    assert status.limits == RateLimits(10, 10_000, 100) and status.limits_source == "tenant"
    await send(6)
    status = await tracker.check_rate_limit_status(tenant, "groq")
    assert (status.requests_last_minute, status.tokens_last_minute) == (6, 120)
    assert (status.requests_last_day, status.tokens_last_day) == (6, 120)
    assert (status.usage_percent, status.status, status.should_failover) == (60, "normal", False)
    await send(2)
    status = await tracker.check_rate_limit_status(tenant, "groq")
    assert (status.usage_percent, status.status, status.should_failover) == (80, "warning", False)
    await send(1)
    status = await tracker.check_rate_limit_status(tenant, "groq")
    assert (status.usage_percent, status.status, status.should_failover) == (90, "critical", True)

    # No configured limits: the provider defaults (groq: 30 rpm).
    other = await make_tenant(pg)
    status = await tracker.check_rate_limit_status(other, "groq")
    assert status.limits_source == "default" and status.limits.requests_per_minute == 30

    bad = await make_tenant(
        pg, inference_config={"rate_limits": {"groq": {"requests_per_minute": "lots"}}}
    )
    with pytest.raises(InvalidTenantConfigError) as err:
        await tracker.check_rate_limit_status(bad, "groq")
    assert err.value.field == "inference_config.rate_limits.groq.requests_per_minute"
    await tracker.close()


async def test_rate_limits_are_found_under_any_spelling_of_the_provider(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """Limits written under "Groq" apply to "groq" and to "Groq (Llama 3.3 70B)": the
    provider name is normalised once, as the router does, on both sides."""
    limits = {"requests_per_minute": 4, "tokens_per_minute": 1_000, "requests_per_day": 50}
    tenant = await make_tenant(pg, inference_config={"rate_limits": {"Groq": limits}})
    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()
    for _ in range(2):
        await tracker.track_request(
            tenant_id=tenant,
            provider="groq",
            model_name="llama-3.3-70b-versatile",
            endpoint="/api/chat",
            latency_ms=5,
            input_tokens=10,
            output_tokens=10,
        )
    assert await tracker.flush(timeout=5)
    for name in ("groq", "Groq", "Groq (Llama 3.3 70B)"):
        status = await tracker.check_rate_limit_status(tenant, name)
        assert status.provider == "groq" and status.limits_source == "tenant", name
        assert status.limits == RateLimits(4, 1_000, 50), name
        assert (status.requests_last_minute, status.usage_percent) == (2, 50), name

    twice = await make_tenant(
        pg, inference_config={"rate_limits": {"groq": limits, "GROQ": limits}}
    )
    with pytest.raises(InvalidTenantConfigError) as err:
        await tracker.check_rate_limit_status(twice, "groq")
    assert err.value.field.startswith("inference_config.rate_limits.")
    await tracker.close()


async def test_process_wide_tracker_is_made_once(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_dsn)
    monkeypatch.setenv("LLM_GATEWAY_SPOOL_DIR", str(tmp_path))
    trackers = await asyncio.gather(*(get_usage_tracker() for _ in range(10)))
    assert len({id(t) for t in trackers}) == 1
    tenant = uuid.uuid4()
    usage_id = await track_usage(
        tenant, "groq", "llama-3.3-70b-versatile", "/api/chat", latency_ms=7, input_tokens=1
    )
    backlog = await close_usage_tracker()
    assert backlog is not None and backlog.written_rows == 1
    row = await pg.fetchrow(
        "SELECT id, output_tokens FROM model_usage_stats WHERE tenant_id=$1", tenant
    )
    assert row is not None and row["id"] == usage_id and row["output_tokens"] is None


async def test_maintenance_runs_at_start_and_periodically_on_a_borrowed_pool(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """A function earlier on the search_path stands in for llm_gateway_maintain_usage()."""
    schema = f"maint_{uuid.uuid4().hex[:8]}"
    await pg.execute(
        f"CREATE SCHEMA {schema};"
        f" CREATE TABLE {schema}.calls (at timestamptz NOT NULL DEFAULT now());"
        f" CREATE FUNCTION {schema}.llm_gateway_maintain_usage() RETURNS void LANGUAGE sql"
        f" AS $$ INSERT INTO {schema}.calls DEFAULT VALUES $$"
    )
    pool = await asyncpg.create_pool(
        pg_dsn, min_size=1, max_size=3, server_settings={"search_path": f"{schema},public"}
    )
    try:
        tenant = uuid.uuid4()
        tracker = ModelUsageTracker(
            pool=pool, spool_dir=tmp_path, maintenance_interval=0.05, flush_interval=0.02
        )
        await tracker.start()
        for _ in range(200):
            tracker.record(make_row(tenant))
            if await pg.fetchval(f"SELECT count(*) FROM {schema}.calls") >= 3:
                break
            await asyncio.sleep(0.01)
        assert await pg.fetchval(f"SELECT count(*) FROM {schema}.calls") >= 3
        backlog = await tracker.close()
        n = backlog.written_rows
        assert n >= 1 and await count_rows(pg, tenant) == (n, n)
        # Every connection of the borrowed pool has its defaults back (no codec, no temp table).
        conns = [await pool.acquire() for _ in range(3)]
        for conn in conns:
            assert await conn.fetchval("""SELECT '{"a": 1}'::jsonb""") == '{"a": 1}'
            assert (
                await conn.fetchval("SELECT to_regclass('pg_temp.llm_gateway_usage_stage')") is None
            )
            await pool.release(conn)
    finally:
        await pool.close()
        await pg.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_failing_maintenance_is_logged_not_fatal(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    schema = f"maint_{uuid.uuid4().hex[:8]}"
    await pg.execute(
        f"CREATE SCHEMA {schema}; CREATE FUNCTION {schema}.llm_gateway_maintain_usage()"
        f" RETURNS void LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'maintenance broke'; END $$"
    )
    pool = await asyncpg.create_pool(
        pg_dsn, min_size=1, max_size=3, server_settings={"search_path": f"{schema},public"}
    )
    try:
        tenant = uuid.uuid4()
        tracker = ModelUsageTracker(pool=pool, spool_dir=tmp_path, flush_interval=0.02)
        await tracker.start()
        for i in range(10):
            tracker.record(make_row(tenant, i))
        assert await tracker.flush(timeout=5)
        await eventually(lambda: "maintenance broke" in caplog.text)
        backlog = await tracker.close()
        assert backlog.written_rows == 10 and await count_rows(pg, tenant) == (10, 10)
    finally:
        await pool.close()
        await pg.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_something_that_is_not_a_row_does_not_block_the_writer(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    tenant = uuid.uuid4()
    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()
    tracker.record(make_row(tenant, 0))
    tracker.record("not a usage record")  # type: ignore[arg-type]
    tracker.record(make_row(tenant, 1))
    backlog = await tracker.close()
    assert (backlog.written_rows, backlog.rejected_rows, backlog.queued) == (2, 1, 0)
    assert await count_rows(pg, tenant) == (2, 2)
    (kept,) = (tmp_path / "rejected").glob("rejected-*.jsonl")
    assert "not a usage record" in kept.read_text()
