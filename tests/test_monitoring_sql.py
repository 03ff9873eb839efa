"""The operator queries in sql/monitoring and the maintenance functions of migration 002.

Every test works on its own fresh tenants, so rows written by other tests do not matter, and
asserts exact numbers derived from the rows it inserted.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import make_tenant

MONITORING = Path(__file__).resolve().parent.parent / "sql" / "monitoring"

OPERATOR_QUERY = """
SELECT provider, model_name, COUNT(*) as requests, SUM(total_tokens) as tokens,
       SUM(estimated_cost_usd) as cost_usd, AVG(latency_ms) as avg_latency
FROM model_usage_stats WHERE tenant_id = $1 AND timestamp >= NOW() - INTERVAL '24 hours'
GROUP BY provider, model_name ORDER BY requests DESC;
"""

RATE_LIMIT = "Rate limit reached"
INSERT = """
INSERT INTO model_usage_stats
    (id, tenant_id, provider, model_name, input_tokens, output_tokens, latency_ms,
     estimated_cost_usd, status, error_message, "timestamp")
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
"""


def monitoring_sql(name: str) -> str:
    """The query of ``sql/monitoring/<name>``, with psql's ``:'tenant_id'`` made ``$1``."""
    return (MONITORING / name).read_text().replace(":'tenant_id'", "$1")


@dataclass(frozen=True, slots=True)
class Row:
    tenant: str
    provider: str
    model: str
    age: timedelta
    status: str
    input_tokens: int | None
    output_tokens: int | None
    cost: Decimal | None
    latency_ms: int
    error: str | None = None


def _h(hours: float) -> timedelta:
    return timedelta(hours=hours)


D = Decimal
GPT, MINI, LLAMA, CLAUDE = "gpt-4o", "gpt-4o-mini", "llama-3.3-70b", "claude-haiku"
ROWS: tuple[Row, ...] = (
    # Tenant A, last 24 hours.
    Row("A", "openai", GPT, _h(1), "success", 100, 50, D("0.010000"), 200),
    Row("A", "openai", GPT, _h(2), "success", 200, 100, D("0.020000"), 400),
    Row("A", "openai", GPT, _h(3), "rate_limit", None, None, None, 50, RATE_LIMIT),
    Row("A", "openai", MINI, _h(4), "success", 1000, 500, D("0.001000"), 300),
    Row("A", "groq", LLAMA, _h(5), "success", 300, 100, None, 100),  # no known price
    Row("A", "groq", LLAMA, _h(5), "success", 20, 20, None, 150),
    Row("A", "groq", LLAMA, _h(6), "rate_limit", None, None, None, 30, RATE_LIMIT),
    Row("A", "groq", LLAMA, _h(7), "rate_limit", None, None, None, 30, RATE_LIMIT),
    Row("A", "groq", LLAMA, _h(8), "timeout", None, None, None, 30000, "Request timed out"),
    Row("A", "openai", GPT, _h(9), "error", None, None, None, 1000, "Upstream returned 500"),
    Row("A", "anthropic", CLAUDE, _h(10), "auth_error", None, None, None, 20, "Invalid API key"),
    # Cancelled mid-stream: input counted, output unknown, so total_tokens is NULL.
    Row(
        "A",
        "anthropic",
        CLAUDE,
        _h(11),
        "cancelled",
        500,
        None,
        D("0.001500"),
        700,
        "Client disconnected",
    ),
    # Tenant A, older than 24 hours but within 30 days.
    Row("A", "openai", GPT, _h(25), "success", 100, 100, D("0.050000"), 500),
    Row("A", "openai", GPT, timedelta(days=10), "error", None, None, None, 900, "Bad gateway"),
    Row("A", "groq", LLAMA, timedelta(days=10), "success", 10, 10, None, 80),
    Row("A", "anthropic", CLAUDE, timedelta(days=20), "success", 50, 50, D("0.500000"), 600),
    # Tenant A, older than 30 days; the 70-day-old rows predate the earliest partition
    # (previous month) and land in the default partition.
    Row("A", "openai", GPT, timedelta(days=40), "success", 1000, 1000, D("1.000000"), 500),
    Row("A", "openai", GPT, timedelta(days=70), "success", 7, 7, D("0.700000"), 500),
    Row("A", "groq", LLAMA, timedelta(days=70), "rate_limit", None, None, None, 40, RATE_LIMIT),
    # Tenant B: must never show up in tenant A's numbers.
    Row("B", "openai", GPT, _h(2), "success", 10, 10, D("0.002000"), 100),
    Row("B", "groq", LLAMA, _h(3), "rate_limit", None, None, None, 10, RATE_LIMIT),
    Row("B", "openai", GPT, timedelta(days=12), "success", 1, 1, D("0.003000"), 100),
    Row("B", "groq", LLAMA, timedelta(days=70), "success", 5, 5, D("0.000500"), 100),
)


@dataclass(frozen=True, slots=True)
class Dataset:
    now: datetime
    tenants: dict[str, uuid.UUID]
    stamps: dict[Row, datetime]  # when each row of ROWS was written


async def _insert(conn: asyncpg.Connection, tenant_id: uuid.UUID, row: Row, at: datetime) -> None:
    await conn.execute(
        INSERT,
        uuid.uuid4(),
        tenant_id,
        row.provider,
        row.model,
        row.input_tokens,
        row.output_tokens,
        row.latency_ms,
        row.cost,
        row.status,
        row.error,
        at,
    )


async def _load(dsn: str) -> Dataset:
    conn = await asyncpg.connect(dsn)
    try:
        now: datetime = await conn.fetchval("SELECT now()")
        tenants = {name: await make_tenant(conn, name=f"monitoring-{name}") for name in "AB"}
        stamps: dict[Row, datetime] = {}
        for i, row in enumerate(ROWS):
            # A microsecond apart, so rows of the same age still order deterministically.
            stamps[row] = now - row.age - timedelta(microseconds=i)
            await _insert(conn, tenants[row.tenant], row, stamps[row])
        return Dataset(now, tenants, stamps)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def dataset(pg_dsn: str) -> Iterator[Dataset]:
    yield asyncio.run(_load(pg_dsn))


def _sum(values: Iterable[int | Decimal | None]) -> Any:
    """SQL SUM: NULLs skipped, NULL when nothing is left."""
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _total(row: Row) -> int | None:
    if row.input_tokens is None or row.output_tokens is None:
        return None
    return row.input_tokens + row.output_tokens


def expected_daily(data: Dataset, tenants: str, *, days: int = 30) -> list[tuple[Any, ...]]:
    """daily_cost.sql computed in Python: (day, provider, requests, tokens, cost, unpriced)."""
    first_day = data.now.astimezone(UTC).date() - timedelta(days=days - 1)
    groups: dict[tuple[date, str], list[Row]] = {}
    for row, at in data.stamps.items():
        day = at.astimezone(UTC).date()
        if row.tenant in tenants and day >= first_day:
            groups.setdefault((day, row.provider), []).append(row)
    return [
        (
            day,
            provider,
            len(rows),
            _sum(_total(r) for r in rows),
            _sum(r.cost for r in rows),
            sum(r.cost is None for r in rows),
        )
        for (day, provider), rows in sorted(groups.items())
    ]


def _tuples(records: Iterable[asyncpg.Record]) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in records]


async def _set(conn: asyncpg.Connection, key: str, value: str | None) -> None:
    await conn.execute("SELECT llm_gateway_set_setting($1, $2)", key, value)


async def maintain(conn: asyncpg.Connection) -> asyncpg.Record:
    result = await conn.fetchrow("SELECT * FROM llm_gateway_maintain_usage()")
    assert result is not None
    return result


# --- the operator queries ----------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(MONITORING.glob("*.sql")), ids=lambda p: p.name)
def test_each_file_says_what_it_answers_and_how_to_run_it(path: Path) -> None:
    text = path.read_text()
    header = text.split("SELECT", 1)[0]
    assert header.startswith("-- ") and len(header.splitlines()) >= 3
    assert 'psql "$DATABASE_URL"' in header and f"-f sql/monitoring/{path.name}" in header
    assert ("-v tenant_id=" in header) == (":'tenant_id'" in text)
    assert path.name in (MONITORING / "README.md").read_text()


async def test_usage_by_tenant_file_is_the_verbatim_operator_query(
    pg: asyncpg.Connection, dataset: Dataset
) -> None:
    text = (MONITORING / "usage_by_tenant.sql").read_text()
    assert OPERATOR_QUERY.strip().replace("$1", ":'tenant_id'") in text

    expected = [
        ("groq", LLAMA, 5, 440, None, D("6062")),  # (100+150+30+30+30000) / 5
        ("openai", GPT, 4, 450, D("0.030000"), D("412.5")),  # (200+400+50+1000) / 4
        ("anthropic", CLAUDE, 2, None, D("0.001500"), D("360")),
        ("openai", MINI, 1, 1500, D("0.001000"), D("300")),
    ]
    tenant = dataset.tenants["A"]
    assert _tuples(await pg.fetch(OPERATOR_QUERY, tenant)) == expected
    assert _tuples(await pg.fetch(monitoring_sql("usage_by_tenant.sql"), tenant)) == expected
    b_rows = await pg.fetch(OPERATOR_QUERY, dataset.tenants["B"])
    assert sorted(_tuples(b_rows)) == [
        ("groq", LLAMA, 1, None, None, D("10")),
        ("openai", GPT, 1, 20, D("0.002000"), D("100")),
    ]


async def test_rate_limit_status(pg: asyncpg.Connection, dataset: Dataset) -> None:
    rows = await pg.fetch(monitoring_sql("rate_limit_status.sql"), dataset.tenants["A"])
    last_groq = dataset.stamps[ROWS[6]]  # 6 h ago, newer than the 7 h one
    last_openai = dataset.stamps[ROWS[2]]
    assert _tuples(rows) == [
        ("groq", 5, 2, D("40.00"), last_groq),
        ("openai", 5, 1, D("20.00"), last_openai),
        ("anthropic", 2, 0, D("0.00"), None),
    ]


async def test_error_analysis(pg: asyncpg.Connection, dataset: Dataset) -> None:
    rows = await pg.fetch(monitoring_sql("error_analysis.sql"), dataset.tenants["A"])
    s = dataset.stamps
    assert _tuples(rows) == [
        ("groq", LLAMA, "rate_limit", RATE_LIMIT, 2, s[ROWS[7]], s[ROWS[6]]),
        ("openai", GPT, "rate_limit", RATE_LIMIT, 1, s[ROWS[2]], s[ROWS[2]]),
        ("groq", LLAMA, "timeout", "Request timed out", 1, s[ROWS[8]], s[ROWS[8]]),
        ("openai", GPT, "error", "Upstream returned 500", 1, s[ROWS[9]], s[ROWS[9]]),
        ("anthropic", CLAUDE, "auth_error", "Invalid API key", 1, s[ROWS[10]], s[ROWS[10]]),
        ("anthropic", CLAUDE, "cancelled", "Client disconnected", 1, s[ROWS[11]], s[ROWS[11]]),
    ]


async def test_daily_cost_for_one_tenant(pg: asyncpg.Connection, dataset: Dataset) -> None:
    rows = _tuples(await pg.fetch(monitoring_sql("daily_cost.sql"), dataset.tenants["A"]))
    assert rows == expected_daily(dataset, "A")
    # The 40- and 70-day-old rows are outside the window; NULL costs are counted as unpriced.
    assert sum(r[2] for r in rows) == 16
    assert sum(r[4] or 0 for r in rows) == D("0.582500")
    assert sum(r[5] for r in rows) == 10
    assert {r[1] for r in rows} == {"openai", "groq", "anthropic"}


async def test_daily_cost_all_tenants_counts_every_tenant(
    pg: asyncpg.Connection, dataset: Dataset
) -> None:
    def by_key(records: Iterable[asyncpg.Record]) -> dict[tuple[date, str], tuple[Any, ...]]:
        return {(r["day_utc"], r["provider"]): tuple(r)[2:] for r in records}

    all_tenants = monitoring_sql("daily_cost_all_tenants.sql")
    tx = pg.transaction()
    await tx.start()  # rolled back: our extra rows vanish, and now() stays put in between
    try:
        now: datetime = await pg.fetchval("SELECT now()")
        before = by_key(await pg.fetch(all_tenants))
        tenant = await make_tenant(pg)
        extra = (
            Row("C", "openai", GPT, _h(0.5), "success", 10, 20, D("0.100000"), 10),
            Row("C", "openai", GPT, _h(0.5), "success", 1, 2, None, 10),
            Row("C", "mistral", "mistral-large", _h(0.5), "error", None, None, None, 10, "x"),
        )
        for row in extra:
            await _insert(pg, tenant, row, now - row.age)
        after_rows = await pg.fetch(all_tenants)
        # The rollup gives the same rows once the window's hours are refreshed.
        await pg.execute(
            "SELECT llm_gateway_refresh_usage_hourly($1, 'infinity')", now - timedelta(days=31)
        )
        rollup_rows = await pg.fetch(monitoring_sql("daily_cost_all_tenants_rollup.sql"))
    finally:
        await tx.rollback()

    after = by_key(after_rows)
    day = (now - _h(0.5)).astimezone(UTC).date()
    requests, tokens, cost, unpriced = before.get((day, "openai"), (0, None, None, 0))
    assert {k: v for k, v in after.items() if before.get(k) != v} == {
        (day, "openai"): (requests + 2, _sum([tokens, 33]), _sum([cost, D("0.1")]), unpriced + 1),
        (day, "mistral"): (1, None, None, 1),
    }
    # Tenants A and B are in there too.
    a_and_b = expected_daily(dataset, "AB")
    assert all(after[(d, p)][0] >= n for d, p, n, *_ in a_and_b)
    assert _tuples(rollup_rows) == _tuples(after_rows)


# --- partitions ----------------------------------------------------------------------------------


async def _where(conn: asyncpg.Connection, tenants: list[uuid.UUID]) -> Counter[str]:
    rows = await conn.fetch(
        "SELECT tableoid::regclass::text AS part FROM model_usage_stats"
        " WHERE tenant_id = ANY($1::uuid[])",
        tenants,
    )
    return Counter(r["part"] for r in rows)


async def test_ensure_partitions_moves_default_rows_without_losing_any(
    pg: asyncpg.Connection, dataset: Dataset
) -> None:
    tenant = await make_tenant(pg)
    # Months nobody else writes to, long before the earliest partition.
    old = [datetime(2001, 2, d, 12, tzinfo=UTC) for d in (1, 14, 28)]
    old += [datetime(2001, 3, 1, tzinfo=UTC), datetime(2001, 3, 31, 23, 59, tzinfo=UTC)]
    for at in old:
        await _insert(pg, tenant, ROWS[0], at)
    assert await _where(pg, [tenant]) == Counter({"model_usage_stats_default": 5})
    ours = [tenant, *dataset.tenants.values()]
    count_before = await pg.fetchval(
        "SELECT count(*) FROM model_usage_stats WHERE tenant_id = ANY($1::uuid[])", ours
    )

    created = {
        r["partition_name"]: r
        for r in await pg.fetch("SELECT * FROM llm_gateway_ensure_usage_partitions()")
    }

    feb, mar = created["model_usage_stats_p2001_02"], created["model_usage_stats_p2001_03"]
    assert (feb["range_from"], feb["range_to"], feb["rows_moved"]) == (
        datetime(2001, 2, 1, tzinfo=UTC),
        datetime(2001, 3, 1, tzinfo=UTC),
        3,
    )
    assert (mar["range_from"], mar["range_to"], mar["rows_moved"]) == (
        datetime(2001, 3, 1, tzinfo=UTC),
        datetime(2001, 4, 1, tzinfo=UTC),
        2,
    )
    assert await _where(pg, [tenant]) == Counter(
        {"model_usage_stats_p2001_02": 3, "model_usage_stats_p2001_03": 2}
    )
    count_after = await pg.fetchval(
        "SELECT count(*) FROM model_usage_stats WHERE tenant_id = ANY($1::uuid[])", ours
    )
    assert count_after == count_before == 5 + len(ROWS)
    # The dataset's 70-day-old rows now sit in their monthly partition too.
    month = (dataset.now - timedelta(days=70)).astimezone(UTC).strftime("%Y_%m")
    spots = await _where(pg, list(dataset.tenants.values()))
    assert "model_usage_stats_default" not in spots
    assert spots[f"model_usage_stats_p{month}"] >= 3
    # The new partitions carry every index of the parent (4 of 001, 4 of 008).
    indexes = await pg.fetchval(
        "SELECT count(*) FROM pg_index WHERE indrelid = 'model_usage_stats_p2001_02'::regclass"
    )
    assert indexes == 8
    # Nothing left to do on a second run.
    assert await pg.fetch("SELECT * FROM llm_gateway_ensure_usage_partitions()") == []


async def test_retention_drops_old_partitions_and_keeps_newer_ones(pg: asyncpg.Connection) -> None:
    tenant = await make_tenant(pg)
    this_month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)

    def months_ago(n: int) -> datetime:
        y, m = divmod(this_month.year * 12 + this_month.month - 1 - n, 12)
        return this_month.replace(year=y, month=m + 1)

    for n in (14, 13, 12):  # 12 months ago is the oldest month a 12-month retention keeps
        await _insert(pg, tenant, ROWS[0], months_ago(n) + timedelta(days=3))
    await pg.execute("SELECT llm_gateway_ensure_usage_partitions()")
    names = {n: f"model_usage_stats_p{months_ago(n):%Y_%m}" for n in (14, 13, 12)}

    assert await pg.fetch("SELECT * FROM llm_gateway_apply_usage_retention()") == []  # NULL
    try:
        await _set(pg, "usage_retention_months", "12")
        dropped = [
            r[0] for r in await pg.fetch("SELECT * FROM llm_gateway_apply_usage_retention()")
        ]
    finally:
        await _set(pg, "usage_retention_months", None)

    assert names[14] in dropped and names[13] in dropped and names[12] not in dropped
    assert all(name < names[12] for name in dropped)  # pYYYY_MM names sort by month
    assert await _where(pg, [tenant]) == Counter({names[12]: 1})
    remaining = {
        r["partition"]
        for r in await pg.fetch("SELECT partition::text FROM llm_gateway_usage_partitions()")
    }
    assert "model_usage_stats_default" in remaining and names[12] in remaining
    assert names[14] not in remaining


# --- rollup and maintenance ----------------------------------------------------------------------


async def _rollup(conn: asyncpg.Connection, tenants: Iterable[uuid.UUID]) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(
        "SELECT tenant_id, hour, provider, model_name, status, requests, input_tokens,"
        " output_tokens, total_tokens, cost_usd, unpriced_requests, latency_ms_sum,"
        " latency_ms_max, refreshed_at FROM model_usage_hourly WHERE tenant_id = ANY($1::uuid[])"
        " ORDER BY 1, 2, 3, 4, 5",
        list(tenants),
    )
    return _tuples(rows)


async def test_rollup_refresh_twice_gives_the_same_numbers_as_the_raw_table(
    pg: asyncpg.Connection, dataset: Dataset
) -> None:
    window = (dataset.now - timedelta(days=80), dataset.now + _h(1))
    await pg.fetchval("SELECT llm_gateway_refresh_usage_hourly($1, $2)", *window)
    first = await _rollup(pg, dataset.tenants.values())
    assert await pg.fetchval("SELECT llm_gateway_refresh_usage_hourly($1, $2)", *window) == 0
    assert await _rollup(pg, dataset.tenants.values()) == first  # not even refreshed_at moved

    for name, tenant in dataset.tenants.items():
        raw = _tuples(await pg.fetch(monitoring_sql("daily_cost.sql"), tenant))
        rollup = _tuples(await pg.fetch(monitoring_sql("daily_cost_rollup.sql"), tenant))
        assert rollup == raw == expected_daily(dataset, name)

    # Two priced-less groq successes in one hour: sums of NULL costs stay NULL.
    hour = dataset.stamps[ROWS[4]].replace(minute=0, second=0, microsecond=0)
    groq = await pg.fetchrow(
        "SELECT requests, input_tokens, output_tokens, total_tokens, cost_usd,"
        " unpriced_requests, latency_ms_sum, latency_ms_max FROM model_usage_hourly"
        " WHERE tenant_id = $1 AND hour = $2 AND provider = 'groq' AND status = 'success'",
        dataset.tenants["A"],
        hour,
    )
    assert groq is not None and tuple(groq) == (2, 320, 120, 440, None, 2, 250, 150)
    assert sum(r[5] for r in first) == len(ROWS)  # every row, even the 70-day-old ones


async def test_rollup_refresh_picks_up_late_rows_and_removes_vanished_ones(
    pg: asyncpg.Connection,
) -> None:
    tenant = await make_tenant(pg)
    now: datetime = await pg.fetchval("SELECT now()")
    at = (now - _h(30)).replace(minute=10)
    window = (now - timedelta(days=2), now)
    refresh = "SELECT llm_gateway_refresh_usage_hourly($1, $2)"
    hourly = "SELECT requests, total_tokens, cost_usd FROM model_usage_hourly WHERE tenant_id = $1"
    daily = (
        "SELECT requests FROM model_usage_daily_totals"
        " WHERE day = $1 AND provider = 'openai' AND model_name = $2 AND status = 'success'"
    )
    day = at.astimezone(UTC).date()
    others = await pg.fetchval(
        "SELECT count(*) FROM model_usage_stats WHERE model_name = $1 AND status = 'success'"
        " AND (\"timestamp\" AT TIME ZONE 'UTC')::date = $2",
        GPT,
        day,
    )

    await _insert(pg, tenant, ROWS[0], at)
    assert await pg.fetchval(refresh, *window) >= 2
    assert _tuples(await pg.fetch(hourly, tenant)) == [(1, 150, D("0.010000"))]
    assert await pg.fetchval(daily, day, GPT) == others + 1

    await _insert(pg, tenant, ROWS[1], at + timedelta(minutes=5))  # arrives late
    assert await pg.fetchval(refresh, *window) == 2  # its hour and its day
    assert _tuples(await pg.fetch(hourly, tenant)) == [(2, 450, D("0.030000"))]
    assert await pg.fetchval(daily, day, GPT) == others + 2
    assert await pg.fetchval(refresh, *window) == 0

    await pg.execute("DELETE FROM model_usage_stats WHERE tenant_id = $1", tenant)
    assert await pg.fetchval(refresh, *window) == 2
    assert await pg.fetch(hourly, tenant) == []
    assert await pg.fetchval(daily, day, GPT) == (others or None)


def _hour(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


async def test_maintain_first_run_starts_at_the_oldest_row(
    pg: asyncpg.Connection, dataset: Dataset
) -> None:
    await _set(pg, "usage_rollup_refreshed_to", None)
    oldest: datetime = await pg.fetchval('SELECT min("timestamp") FROM model_usage_stats')
    now: datetime = await pg.fetchval("SELECT now()")
    result = await maintain(pg)
    assert result["skipped"] is False
    start = min(_hour(oldest), _hour(now) - _h(3))
    assert result["rollup_from"] == start
    assert result["rollup_to"] == min(start + _h(168), _hour(now) + _h(1))
    watermark = await pg.fetchval(
        "SELECT llm_gateway_setting('usage_rollup_refreshed_to')::timestamptz"
    )
    assert watermark == result["rollup_to"]


async def test_maintain_catches_up_after_downtime_and_is_idempotent(
    pg: asyncpg.Connection, dataset: Dataset
) -> None:
    now: datetime = await pg.fetchval("SELECT now()")
    await _set(pg, "usage_rollup_refreshed_to", str(_hour(now) - timedelta(days=40)))
    runs = []
    for _ in range(20):
        runs.append(await maintain(pg))
        if runs[-1]["rollup_to"] > now:
            break
    assert runs[0]["rollup_from"] == _hour(now) - timedelta(days=40) - _h(3)
    for previous, run in itertools.pairwise(runs):
        assert run["rollup_from"] == previous["rollup_to"] - _h(3)  # resumes, 3 h overlap
        assert run["rollup_to"] - run["rollup_from"] <= _h(168)
    assert len(runs) == 6  # 40 days + 4 h in steps of 165 h
    assert runs[-1]["rollup_to"] == _hour(now) + _h(1)

    tx = pg.transaction()  # one transaction: now() and the current hour cannot move
    await tx.start()
    try:
        before = await _rollup(pg, dataset.tenants.values())
        first = await maintain(pg)
        second = await maintain(pg)
        after = await _rollup(pg, dataset.tenants.values())
        current: datetime = _hour(await pg.fetchval("SELECT now()"))
    finally:
        await tx.rollback()
    for result in (first, second):
        assert (result["skipped"], result["partitions_created"], result["rows_moved"]) == (
            False,
            0,
            0,
        )
        assert result["partitions_dropped"] == 0
        assert (result["rollup_from"], result["rollup_to"]) == (current - _h(3), current + _h(1))
    assert second["rollup_rows"] == 0 and second["analyzed"] is False
    assert after == before
    raw = _tuples(await pg.fetch(monitoring_sql("daily_cost.sql"), dataset.tenants["A"]))
    rollup = _tuples(await pg.fetch(monitoring_sql("daily_cost_rollup.sql"), dataset.tenants["A"]))
    assert rollup == raw == expected_daily(dataset, "A")


async def test_maintain_runs_once_at_a_time(pg: asyncpg.Connection, pg_dsn: str) -> None:
    other = await asyncpg.connect(pg_dsn)
    tx = pg.transaction()
    await tx.start()
    try:
        mine = await maintain(pg)
        theirs = await maintain(other)
    finally:
        await tx.rollback()
        await other.close()
    assert mine["skipped"] is False
    assert tuple(theirs) == (True, None, None, None, None, None, None, None)


async def test_parent_statistics_know_the_number_of_days(
    pg: asyncpg.Connection, dataset: Dataset
) -> None:
    await _set(pg, "usage_stats_analyzed_at", None)
    result = await maintain(pg)
    assert result["analyzed"] is True
    counts = await pg.fetchrow(
        "SELECT count(DISTINCT (\"timestamp\" AT TIME ZONE 'UTC')::date), count(*)"
        " FROM model_usage_stats"
    )
    assert counts is not None
    days, rows = counts
    stats = await pg.fetch(
        "SELECT statistics_name, n_distinct FROM pg_stats_ext_exprs"
        " WHERE tablename = 'model_usage_stats' AND inherited ORDER BY 1"
    )
    assert [r["statistics_name"] for r in stats] == [
        "model_usage_stats_day_local",
        "model_usage_stats_day_utc",
    ]
    n_distinct = next(r["n_distinct"] for r in stats if r["statistics_name"].endswith("utc"))
    # A small table is sampled whole, so the count is exact. Above a tenth of the rows it is
    # stored as a negative fraction of the row count.
    estimate = n_distinct if n_distinct > 0 else -n_distinct * rows
    assert round(estimate) == days
