"""Upgrading a database that already has rows: migration 009 leaves its daily rollups to the
batched back-fill (012), which maintenance and ``llm-gateway db backfill`` run; ``db status``
and the usage commands say what is left."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from llm_gateway.cli import main
from llm_gateway.migrate import apply_migrations, sql_dir
from tests.conftest import scratch_database
from tests.test_analytics_rollups import PAIRS, assert_rollups_match_raw, insert


@pytest.fixture
def bare_dsn() -> Iterator[str]:
    with scratch_database("backfill", migrated=False) as dsn:
        yield dsn


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def status(capsys: pytest.CaptureFixture[str], dsn: str) -> dict[str, object]:
    code, out, err = cli(capsys, "db", "status", "--dsn", dsn, "--format", "json")
    assert code == 0, err
    found = json.loads(out)["analytics"]
    assert isinstance(found, dict)
    return found


def test_upgrade_with_rows_is_back_filled_after_the_migration(
    bare_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = uuid.uuid4()
    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    today = this_hour.date()
    before_009 = tmp_path / "migrations"
    before_009.mkdir()
    for path in sorted((sql_dir() / "migrations").glob("*.sql"))[:8]:  # 001-008
        shutil.copy(path, before_009)

    async def arrange() -> None:
        assert await apply_migrations(bare_dsn, directory=before_009) == list(range(1, 9))
        conn = await asyncpg.connect(bare_dsn)
        try:
            for k, back in enumerate((timedelta(days=10), timedelta(days=3), timedelta(hours=1))):
                await insert(conn, tenant, this_hour - back, 20, k)
            await conn.execute("SELECT llm_gateway_maintain_usage()")  # 008's maintenance
        finally:
            await conn.close()
        assert await apply_migrations(bare_dsn) == [9, 10, 11, 12]

    asyncio.run(arrange())
    # The migration did not roll the old rows up: it marked the days with rows, up to today.
    state = status(capsys, bare_dsn)
    assert state["rollups_pending_before"] == (today + timedelta(days=1)).isoformat()
    assert state["rollup_days_left"] == 11
    code, out, err = cli(
        capsys, "usage", "report", "--dsn", bare_dsn, "--tenant", str(tenant), "--by", "user"
    )
    assert code == 0 and "still being back-filled" in err and "11 left" in err

    async def maintain() -> None:
        conn = await asyncpg.connect(bare_dsn)
        try:
            await conn.execute("SELECT llm_gateway_maintain_usage()")
        finally:
            await conn.close()

    asyncio.run(maintain())  # one day per run
    assert status(capsys, bare_dsn)["rollups_pending_before"] == today.isoformat()

    code, out, err = cli(capsys, "db", "backfill", "--dsn", bare_dsn, "--days", "4")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["rollups"] * 3  # 10 days left: 4+4+2
    assert ", 0 days left" in lines[2]
    assert any(line.startswith("anomaly scores:") for line in lines)
    assert lines[-1].startswith("analytics back-fill complete")

    async def check() -> None:
        conn = await asyncpg.connect(bare_dsn)
        try:
            await assert_rollups_match_raw(conn, tenant)
        finally:
            await conn.close()

    asyncio.run(check())
    state = status(capsys, bare_dsn)
    assert state["rollups_pending_before"] is None and state["rollup_days_left"] == 0
    assert state["score_days_left"] == 0 and state["scores_to"] is not None
    code, _, err = cli(
        capsys, "usage", "report", "--dsn", bare_dsn, "--tenant", str(tenant), "--by", "user"
    )
    assert code == 0 and err == ""
    code, out, _ = cli(capsys, "db", "backfill", "--dsn", bare_dsn)
    assert code == 0 and out.startswith("analytics back-fill complete")
    code, out, _ = cli(capsys, "db", "status", "--dsn", bare_dsn)
    assert "analytics rollups" in out and "complete" in out


def test_the_merged_009_text_counts_as_applied(
    bare_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """009 was edited in place (it no longer back-fills); a database that applied the text
    first merged (which did) is as current, and ``db status`` says "applied", not "changed"."""

    async def arrange(checksum: str) -> None:
        await apply_migrations(bare_dsn)
        conn = await asyncpg.connect(bare_dsn)
        try:
            await conn.execute(
                "UPDATE llm_gateway_migrations SET checksum = $1 WHERE version = 9", checksum
            )
        finally:
            await conn.close()

    def state() -> str:
        code, out, err = cli(capsys, "db", "status", "--dsn", bare_dsn, "--format", "json")
        assert code == 0, err
        return str({m["version"]: m["state"] for m in json.loads(out)["migrations"]}[9])

    asyncio.run(arrange("3b7ebee565923aa3"))  # 009 as merged in 2e9172e
    assert state() == "applied"
    asyncio.run(arrange("a005b7a720583033"))  # 0af6d0c: older functions, not the same
    assert state() == "changed"


def test_upgrade_from_before_008_leaves_its_rollups_to_the_back_fill(
    bare_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """008 no longer rolls old rows up inside the migration (12 minutes at 10 M rows); the
    batched back-fill fills its per-user rollup with 009's."""
    tenant = uuid.uuid4()
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    before_008 = tmp_path / "migrations"
    before_008.mkdir()
    for path in sorted((sql_dir() / "migrations").glob("*.sql"))[:7]:  # 001-007
        shutil.copy(path, before_008)
    user_daily_sql, raw_sql = PAIRS["user_daily"]

    async def arrange() -> None:
        assert await apply_migrations(bare_dsn, directory=before_008) == list(range(1, 8))
        conn = await asyncpg.connect(bare_dsn)
        try:
            await conn.execute(  # 007's columns: no session, no tags yet
                "INSERT INTO model_usage_stats (id, tenant_id, user_id, provider, model_name,"
                " endpoint, input_tokens, output_tokens, latency_ms, estimated_cost_usd, status,"
                " \"timestamp\") SELECT gen_random_uuid(), $1, 'u' || (i % 2), 'openai',"
                " 'm', '/e', 10, 5, 100, 0.001, 'success', $2::timestamptz - i * interval '1 h'"
                " FROM generate_series(1, 30) AS i",
                tenant,
                day,
            )
            await conn.execute("SELECT llm_gateway_maintain_usage()")  # 002's maintenance
        finally:
            await conn.close()
        assert await apply_migrations(bare_dsn) == list(range(8, 13))
        conn = await asyncpg.connect(bare_dsn)
        try:
            assert await conn.fetch(user_daily_sql, tenant) == []  # not in the migration
        finally:
            await conn.close()

    asyncio.run(arrange())
    code, _, err = cli(capsys, "db", "backfill", "--dsn", bare_dsn)
    assert code == 0, err

    async def check() -> None:
        conn = await asyncpg.connect(bare_dsn)
        try:
            got = sorted(tuple(r) for r in await conn.fetch(user_daily_sql, tenant))
            assert got and got == sorted(tuple(r) for r in await conn.fetch(raw_sql, tenant))
        finally:
            await conn.close()

    asyncio.run(check())
