"""Nothing lost, nothing doubled: outages, restarts, replays, corrupt spools, deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tests.test_usage_tracker import (
    closed_port_dsn,
    count_rows,
    eventually,
    make_row,
    tracker_for,
)
from usage.spool import Spool

ROOT = Path(__file__).resolve().parent.parent


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("usage-*.jsonl"))


async def spool_while_down(directory: Path, tenant: uuid.UUID, n: int) -> None:
    """Record ``n`` rows with PostgreSQL unreachable, then close: they end in the spool."""
    tracker = tracker_for(closed_port_dsn(), directory)
    await tracker.start()
    for i in range(n):
        tracker.record(make_row(tenant, i))
    backlog = await tracker.close(timeout=5)
    assert (backlog.spooled_rows, backlog.spooled_total, backlog.written_rows) == (n, n, 0)
    assert backlog.queued == 0


def run_python(code: str, *args: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; it prints one JSON object last."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


REPLAY_IN_NEW_PROCESS = """
    import asyncio, dataclasses, json, sys
    from usage import ModelUsageTracker

    async def main():
        tracker = ModelUsageTracker(sys.argv[1], spool_dir=sys.argv[2])
        await tracker.start()
        backlog = await tracker.close()
        print(json.dumps(dataclasses.asdict(backlog), default=str))

    asyncio.run(main())
"""


async def test_outage_then_new_process_writes_exactly_1000(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    tenant = uuid.uuid4()
    await spool_while_down(tmp_path, tenant, 1000)
    assert await count_rows(pg, tenant) == (0, 0)
    backlog = run_python(REPLAY_IN_NEW_PROCESS, pg_dsn, str(tmp_path))
    assert backlog["replayed_rows"] == 1000 and backlog["duplicate_rows"] == 0
    assert backlog["spooled_rows"] == 0 and backlog["corrupt_lines"] == 0
    assert await count_rows(pg, tenant) == (1000, 1000)
    assert spool_files(tmp_path) == []


async def test_replaying_the_same_spool_twice_writes_nothing_twice(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """A crash after the database commit but before the file delete replays the file again."""
    tenant = uuid.uuid4()
    spool_dir = tmp_path / "spool"
    await spool_while_down(spool_dir, tenant, 500)
    saved = tmp_path / "saved"
    shutil.copytree(spool_dir, saved)
    first = tracker_for(pg_dsn, spool_dir)
    await first.start()
    assert (await first.close()).replayed_rows == 500
    assert spool_files(spool_dir) == []
    for path in spool_files(saved):  # the files "survive" the crash
        shutil.copy2(path, spool_dir / path.name)
    second = tracker_for(pg_dsn, spool_dir)
    await second.start()
    backlog = await second.close()
    assert (backlog.replayed_rows, backlog.duplicate_rows) == (500, 500)
    assert await count_rows(pg, tenant) == (500, 500)


async def test_truncated_and_corrupt_lines_are_reported_and_skipped(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    tenant = uuid.uuid4()
    await spool_while_down(tmp_path, tenant, 10)
    (path,) = spool_files(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)  # header + 10 rows
    assert len(lines) == 11
    lines[5] = b'{"id": "not a row\n'  # garbage in the middle
    lines[-1] = lines[-1][:40]  # torn last line, no newline
    path.write_bytes(b"".join(lines))

    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()  # must not raise
    backlog = await tracker.close()
    assert (backlog.replayed_rows, backlog.corrupt_lines) == (8, 2)
    assert await count_rows(pg, tenant) == (8, 8)
    assert spool_files(tmp_path) == []
    (kept,) = (tmp_path / "rejected").glob("corrupt-*")
    assert kept.read_bytes().splitlines() == [lines[5].rstrip(b"\n"), lines[-1]]


async def test_a_file_held_by_another_process_is_not_replayed(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    tenant = uuid.uuid4()
    await spool_while_down(tmp_path, tenant, 50)
    (path,) = spool_files(tmp_path)
    other = Spool(tmp_path).claim(path)  # another replayer holds the lock
    assert other is not None and len(other.rows) == 50
    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()
    assert (await tracker.close()).replayed_rows == 0
    assert await count_rows(pg, tenant) == (0, 0) and path.exists()
    other.release()
    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()
    assert (await tracker.close()).replayed_rows == 50
    assert await count_rows(pg, tenant) == (50, 50)


class TcpProxy:
    """A loopback TCP proxy to PostgreSQL that can be taken down and brought back."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        self._dsn = parts
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def dsn(self) -> str:
        netloc = f"{self._dsn.username}@127.0.0.1:{self.port}"
        return urlunsplit(self._dsn._replace(netloc=netloc))

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def test_outage_and_recovery_in_one_process(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    tenant = uuid.uuid4()
    proxy = TcpProxy(pg_dsn)
    await proxy.up()
    tracker = tracker_for(proxy.dsn, tmp_path)
    await tracker.start()
    for i in range(100):
        tracker.record(make_row(tenant, i))
    assert await tracker.flush(timeout=5)
    assert await count_rows(pg, tenant) == (100, 100)

    await proxy.down()
    for i in range(200):
        tracker.record(make_row(tenant, 100 + i))
    assert await tracker.flush(timeout=5)  # spooled after the grace period
    assert tracker.stats.spooled_rows == 200 and not tracker.stats.database_available
    assert await count_rows(pg, tenant) == (100, 100)

    await proxy.up()  # same port: the writer probes, then replays the spool
    await eventually(lambda: tracker.stats.replayed_rows == 200)
    backlog = await tracker.close()
    assert backlog.database_available and backlog.spooled_rows == 0
    assert await count_rows(pg, tenant) == (300, 300)
    await proxy.down()


async def test_close_deadline_spools_what_postgres_does_not_take(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """The writer's COPY hangs on a lock: close() cancels it at its deadline and spools."""
    tenant = uuid.uuid4()
    tracker = tracker_for(pg_dsn, tmp_path, grace_period=30)
    await tracker.start()
    blocker = await asyncpg.connect(pg_dsn)
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("LOCK TABLE model_usage_stats IN SHARE MODE")
    try:
        for i in range(400):
            tracker.record(make_row(tenant, i))
        await eventually(lambda: tracker.stats.in_flight == 400)
        started = time.monotonic()
        backlog = await tracker.close(timeout=0.5)
        assert time.monotonic() - started < 10  # wide: without the deadline it never returns
        assert (backlog.queued, backlog.spooled_rows, backlog.written_rows) == (0, 400, 0)
    finally:
        await tx.rollback()
        await blocker.close()
    replay = tracker_for(pg_dsn, tmp_path)
    await replay.start()
    assert (await replay.close()).replayed_rows == 400
    assert await count_rows(pg, tenant) == (400, 400)


async def test_high_water_spills_while_postgres_is_stuck(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """Writes block on a lock; the queue passes high water and goes to the spool; all land once."""
    tenant = uuid.uuid4()
    tracker = tracker_for(pg_dsn, tmp_path, batch_size=100, high_water=300, write_timeout=0.3)
    await tracker.start()
    blocker = await asyncpg.connect(pg_dsn)
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("LOCK TABLE model_usage_stats IN SHARE MODE")
    try:
        for i in range(1000):
            tracker.record(make_row(tenant, i))
        assert await tracker.flush(timeout=10)
        assert tracker.stats.spooled_total >= 700 and tracker.stats.written_rows == 0
    finally:
        await tx.rollback()
        await blocker.close()
    await eventually(lambda: tracker.stats.spooled_rows == 0, timeout=10)
    backlog = await tracker.close()
    assert backlog.failed_batches >= 1
    assert await count_rows(pg, tenant) == (1000, 1000)


FORGET_TO_CLOSE = """
    import asyncio, sys, uuid
    from tests.test_usage_tracker import closed_port_dsn, make_row, tracker_for

    async def main():
        tracker = tracker_for(closed_port_dsn(), sys.argv[1], grace_period=60)
        await tracker.start()
        for i in range(300):
            tracker.record(make_row(uuid.UUID(sys.argv[2]), i))
        await asyncio.sleep(0)
        # no close(): asyncio.run cancels the writer, then the interpreter exits

    asyncio.run(main())
    print("{}")
"""


async def test_rows_of_a_tracker_never_closed_are_spooled_at_exit(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    tenant = uuid.uuid4()
    run_python(FORGET_TO_CLOSE, str(tmp_path), str(tenant))
    assert sum(int(p.name.rsplit("-n", 1)[1][:-6]) for p in spool_files(tmp_path)) == 300
    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()
    assert (await tracker.close()).replayed_rows == 300
    assert await count_rows(pg, tenant) == (300, 300)


async def test_odd_metadata_survives_the_spool_and_the_database(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """Values JSON cannot hold natively are stored as strings, never lose the row."""
    from decimal import Decimal

    tenant = uuid.uuid4()
    odd = {
        "price": Decimal("1.50"),
        "when": time.struct_time((2024, 1, 2, 3, 4, 5, 0, 0, 0)),
        7: "k",
    }
    down = tracker_for(closed_port_dsn(), tmp_path)
    await down.start()
    down.record(make_row(tenant, metadata=odd))
    await down.close()
    up = tracker_for(pg_dsn, tmp_path)
    await up.start()
    up.record(make_row(tenant, 1, metadata=odd))  # straight to PostgreSQL
    backlog = await up.close()
    assert (backlog.replayed_rows, backlog.written_rows, backlog.corrupt_lines) == (1, 2, 0)
    stored = [
        json.loads(m)
        for m in await pg.fetchval(
            "SELECT array_agg(metadata::text) FROM model_usage_stats WHERE tenant_id = $1", tenant
        )
    ]
    assert stored[0] == stored[1]
    assert stored[0]["price"] == "1.50" and stored[0]["7"] == "k"


async def test_replayed_old_rows_reach_the_hourly_rollup(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """Maintenance recomputes only recent hours; a replay refreshes the hours it wrote."""
    from datetime import UTC, datetime, timedelta

    from tests.test_usage_tracker import make_row

    tenant = uuid.uuid4()
    two_days_ago = datetime.now(UTC).replace(minute=10) - timedelta(days=2)
    down = tracker_for(closed_port_dsn(), tmp_path)
    await down.start()
    for i in range(40):
        down.record(make_row(tenant, i, timestamp=two_days_ago + timedelta(seconds=i)))
    assert (await down.close(timeout=5)).spooled_rows == 40
    up = tracker_for(pg_dsn, tmp_path)
    await up.start()
    assert (await up.close()).replayed_rows == 40
    row = await pg.fetchrow(
        "SELECT sum(requests) AS requests, sum(total_tokens) AS tokens"
        " FROM model_usage_hourly WHERE tenant_id = $1",
        tenant,
    )
    assert row is not None and (row["requests"], row["tokens"]) == (40, 40 * 30)


async def test_router_requests_during_an_outage_land_after_restart(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """1,000 routed requests while the usage database is unreachable; a new process replays."""
    from llm_gateway import TenantLLMRouter, provider_settings
    from llm_gateway.simulator import SimulatedProvider
    from tests.conftest import make_tenant

    tenant = await make_tenant(pg, llm_tokens={"llm7": "k"})
    down = tracker_for(closed_port_dsn(), tmp_path)
    async with SimulatedProvider(name="l") as sim:
        providers = {"llm7": provider_settings("llm7", sim.base_url)}
        async with TenantLLMRouter(pg_dsn, providers=providers, usage_tracker=down) as router:
            sem = asyncio.Semaphore(32)

            async def one(i: int) -> None:
                async with sem:
                    await router.complete_for_tenant(tenant, [{"role": "user", "content": f"{i}"}])

            await asyncio.gather(*(one(i) for i in range(1000)))
        backlog = await down.close(timeout=5)  # the router does not close a tracker it was given
    assert backlog.spooled_total == 1000 and backlog.written_rows == 0
    assert await count_rows(pg, tenant) == (0, 0)
    replayed = run_python(REPLAY_IN_NEW_PROCESS, pg_dsn, str(tmp_path))
    assert replayed["replayed_rows"] == 1000
    assert await count_rows(pg, tenant) == (1000, 1000)
