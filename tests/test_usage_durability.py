"""Nothing lost, nothing doubled: outages, restarts, replays, corrupt spools, deadlines."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.tcp_proxy import TcpProxy
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


async def test_outage_and_recovery_in_one_process(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    tenant = uuid.uuid4()
    async with TcpProxy(pg_dsn) as proxy:
        tracker = tracker_for(proxy.dsn, tmp_path)
        await tracker.start()
        for i in range(100):
            tracker.record(make_row(tenant, i))
        assert await tracker.flush(timeout=5)
        assert await count_rows(pg, tenant) == (100, 100)

        await proxy.cut()
        for i in range(200):
            tracker.record(make_row(tenant, 100 + i))
        assert await tracker.flush(timeout=5)  # spooled after the grace period
        assert tracker.stats.spooled_rows == 200 and not tracker.stats.database_available
        assert await count_rows(pg, tenant) == (100, 100)

        proxy.restore()  # the writer probes, then replays the spool
        await eventually(lambda: tracker.stats.replayed_rows == 200)
        backlog = await tracker.close()
        assert backlog.database_available and backlog.spooled_rows == 0
        assert await count_rows(pg, tenant) == (300, 300)


async def test_a_cut_while_idle_reconnects_without_a_restart(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """The connection dies while the writer waits; after the outage the same process writes
    its new rows and replays its spool while it keeps recording."""
    tenant = uuid.uuid4()
    async with TcpProxy(pg_dsn) as proxy:
        tracker = tracker_for(proxy.dsn, tmp_path, grace_period=0.5)
        await tracker.start()
        n = 0

        async def record_for(seconds: float) -> None:
            nonlocal n
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                tracker.record(make_row(tenant, n))
                n += 1
                await asyncio.sleep(0.01)

        await record_for(0.5)
        assert await tracker.flush(timeout=5)
        assert await count_rows(pg, tenant) == (n, n)

        await proxy.cut()  # the writer is idle: its connection dies between writes
        await asyncio.sleep(0.2)
        await record_for(3.0)
        assert not tracker.stats.database_available
        assert tracker.stats.spooled_total > 0

        spooled = tracker.stats.spooled_total
        proxy.restore()
        restored = time.monotonic()
        recovered: list[float] = []

        async def watch() -> None:  # when the outage's spool is back in PostgreSQL
            await eventually(lambda: tracker.stats.replayed_rows >= spooled, timeout=15)
            recovered.append(time.monotonic() - restored)

        watcher = asyncio.create_task(watch())
        await record_for(1.0)  # the process keeps serving
        deadline = time.monotonic() + 15
        while await count_rows(pg, tenant) != (n, n):  # new rows and the replayed spool
            assert time.monotonic() < deadline, (await count_rows(pg, tenant), n)
            await asyncio.sleep(0.05)
        assert tracker.stats.database_available and tracker.stats.spooled_rows == 0
        await watcher
        print(f"spool replayed {recovered[0]:.2f} s after the restore")
        backlog = await tracker.close()
        assert backlog.spooled_rows == 0 and backlog.queued == 0
        assert await count_rows(pg, tenant) == (n, n)


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


async def test_start_does_not_wait_for_the_spool(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """start() (and so a process's first request) returns before the spool is replayed; the
    writer replays it in the background, between live rows."""
    tenant = uuid.uuid4()
    spool = Spool(tmp_path)
    for f in range(40):
        spool.write([make_row(tenant, f * 25 + i) for i in range(25)])
    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()
    at_start = tracker.backlog()
    assert (at_start.replayed_rows, at_start.spooled_files) == (0, 40)
    tracker.record(make_row(tenant, 5000))  # a live row while the replay goes on
    await eventually(lambda: tracker.backlog().replayed_rows == 1000, timeout=30)
    backlog = await tracker.close()
    assert (backlog.spooled_files, backlog.written_rows) == (0, 1001)
    assert await count_rows(pg, tenant) == (1001, 1001)


async def test_rows_beyond_the_hard_cap_are_dropped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL unreachable and the spool unwritable: memory stops at max_queued rows."""
    tenant = uuid.uuid4()
    spool_dir = tmp_path / "spool"
    tracker = tracker_for(
        closed_port_dsn(), spool_dir, batch_size=100, high_water=200, max_queued=300
    )
    await tracker.start()
    spool_dir.rename(tmp_path / "away")
    spool_dir.write_text("a file where the spool folder was: every spool write fails")
    with caplog.at_level(logging.WARNING, logger="usage"):
        for i in range(350):
            tracker.record(make_row(tenant, i))
        assert tracker.backlog().dropped_rows == 50
        # The writer tries PostgreSQL and the spool, both fail, nothing leaves memory.
        await eventually(lambda: tracker.backlog().failed_batches >= 1, timeout=10)
        await eventually(lambda: "cannot write the usage spool" in caplog.text, timeout=10)
        for i in range(20):
            tracker.record(make_row(tenant, 350 + i))
        backlog = tracker.backlog()
        assert (backlog.dropped_rows, backlog.queued) == (70, 300)
    full = [r for r in caplog.records if "usage queue full" in r.getMessage()]
    assert len(full) == 1 and full[0].levelno == logging.ERROR  # once per episode
    spool_dir.unlink()
    (tmp_path / "away").rename(spool_dir)
    backlog = await tracker.close(timeout=5)
    assert (backlog.spooled_total, backlog.dropped_rows, backlog.queued) == (300, 70, 0)


async def test_a_failed_rollup_refresh_is_kept_and_retried(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """The refresh after a replay hits a lock timeout (a real PostgreSQL failure): the range
    stays pending and a later retry corrects the rollup."""
    from datetime import UTC, datetime, timedelta

    tenant = uuid.uuid4()
    two_days_ago = datetime.now(UTC).replace(minute=10) - timedelta(days=2)
    Spool(tmp_path).write(
        [make_row(tenant, i, timestamp=two_days_ago + timedelta(seconds=i)) for i in range(40)]
    )
    blocker = await asyncpg.connect(pg_dsn)
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("LOCK TABLE model_usage_hourly IN ACCESS EXCLUSIVE MODE")
    # lock_timeout as a server setting of the tracker's connections: the refresh fails fast.
    tracker = tracker_for(pg_dsn + "?lock_timeout=200", tmp_path)
    try:
        await tracker.start()
        await eventually(
            lambda: tracker.backlog().replayed_rows == 40 and tracker.backlog().rollup_pending,
            timeout=10,
        )
    finally:
        await tx.rollback()
        await blocker.close()
    await eventually(lambda: tracker.backlog().rollup_pending == 0, timeout=10)
    await tracker.close()
    row = await pg.fetchrow(
        "SELECT sum(requests) AS requests, sum(total_tokens) AS tokens"
        " FROM model_usage_hourly WHERE tenant_id = $1",
        tenant,
    )
    assert row is not None and (row["requests"], row["tokens"]) == (40, 40 * 30)


def test_the_spool_folder_is_private(tmp_path: Path) -> None:
    """Created 0700; an existing folder of another user, or writable by others, is refused."""
    import os
    import stat

    from usage.spool import SpoolPermissionError

    spool = Spool(tmp_path / "new")
    for folder in (spool.directory, spool.rejected_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700

    readable = tmp_path / "readable"  # e.g. made 0755 by an older version: tightened
    readable.mkdir(mode=0o755)
    readable.chmod(0o755)
    Spool(readable)
    assert stat.S_IMODE(readable.stat().st_mode) == 0o700

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(SpoolPermissionError, match="writable by group or others"):
        Spool(shared)

    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)  # 'nobody'
    with pytest.raises(SpoolPermissionError, match="belongs to uid 65534"):
        Spool(foreign)


async def test_a_tracker_refuses_a_spool_folder_of_another_user(tmp_path: Path) -> None:
    import os

    from usage.spool import SpoolPermissionError

    folder = tmp_path / "spool"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    tracker = tracker_for(closed_port_dsn(), folder)
    with pytest.raises(SpoolPermissionError):
        await tracker.start()


async def test_spool_files_of_another_user_are_set_aside_not_replayed(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """Another local user drops files into the spool: they never become usage rows."""
    import os

    tenant, intruder = uuid.uuid4(), uuid.uuid4()
    spool = Spool(tmp_path)
    spool.write([make_row(tenant, i) for i in range(10)])
    planted = spool.write([make_row(intruder, i) for i in range(10)])
    os.chown(planted, 65534, 65534)
    # A symlink to a file elsewhere (here: another folder's spool file).
    target = Spool(tmp_path.parent / f"{tmp_path.name}-elsewhere").write([make_row(intruder)])
    link = spool.write([make_row(intruder, 98)])
    link.unlink()
    link.symlink_to(target)

    tracker = tracker_for(pg_dsn, tmp_path)
    await tracker.start()
    await eventually(lambda: tracker.backlog().replayed_rows == 10)
    backlog = await tracker.close()
    assert (backlog.replayed_rows, backlog.foreign_files, backlog.spooled_files) == (10, 2, 0)
    assert await count_rows(pg, tenant) == (10, 10)
    assert await count_rows(pg, intruder) == (0, 0)
    aside = sorted(p.name for p in (tmp_path / "rejected").glob("foreign-*"))
    assert len(aside) == 2 and any(planted.name in name for name in aside)
    assert spool_files(tmp_path) == []


async def test_close_replays_what_the_process_spooled(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """PostgreSQL comes back just before shutdown: close() replays the outage's spool."""
    tenant = uuid.uuid4()
    async with TcpProxy(pg_dsn) as proxy:
        tracker = tracker_for(proxy.dsn, tmp_path, max_backoff=30)  # no probe before close
        await tracker.start()
        await proxy.cut()
        for i in range(100):
            tracker.record(make_row(tenant, i))
        assert await tracker.flush(timeout=5)
        assert tracker.backlog().spooled_rows == 100
        proxy.restore()
        backlog = await tracker.close(timeout=10)
    assert (backlog.spooled_rows, backlog.replayed_rows) == (0, 100)
    assert await count_rows(pg, tenant) == (100, 100)
    assert spool_files(tmp_path) == []


@pytest.mark.xfail(
    strict=True,
    reason="known defect: the spool is not keyed by database (README: one spool folder per"
    " database); a tracker replays rows spooled for another database into its own",
)
async def test_rows_spooled_for_another_database_are_not_replayed_into_this_one(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """Two services on one host share a spool folder; one's database is gone (here: a database
    that does not exist on the same server). Its rows must wait for it, not land in the other's."""
    tenant = uuid.uuid4()
    elsewhere = f"{pg_dsn.rpartition('/')[0]}/llmgw_absent_{uuid.uuid4().hex[:8]}"
    down = tracker_for(elsewhere, tmp_path)
    await down.start()
    for i in range(10):
        down.record(make_row(tenant, i))
    backlog = await down.close(timeout=5)
    assert (backlog.spooled_rows, backlog.written_rows) == (10, 0)
    up = tracker_for(pg_dsn, tmp_path)
    await up.start()
    up.record(make_row(tenant, 10))  # the other service's own row: written, as it should be
    backlog = await up.close(timeout=10)
    assert backlog.replayed_rows == 0
    assert await count_rows(pg, tenant) == (1, 1)
    assert len(spool_files(tmp_path)) == 1  # still waiting for its database
