"""The anomaly detector (llm_gateway_usage_anomalies, via tracker.detect_anomalies) on generated
hourly series with weekly seasonality, bounded noise and planted anomalies.

The series go straight into model_usage_tenant_hourly, the detector's input (the refresh that
fills it from raw rows is tested in test_analytics.py); six weeks of hours for a handful of
tenants would be hundreds of thousands of raw rows.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from usage import ModelUsageTracker
from usage.analytics.anomalies import Anomaly, detect_anomalies

# A fixed "now" (a Wednesday, 14:20 UTC): the current hour is 14:00, never scored.
NOW = datetime(2031, 3, 12, 14, 20, tzinfo=UTC)
THIS_HOUR = NOW.replace(minute=0)
HISTORY = timedelta(weeks=6)
SCORED = timedelta(days=7)
REQUEST_NOISE = 0.15  # requests: uniform multiplicative noise of +-15 %
COST_NOISE = 0.05  # cost per request: +-5 % on top (+-20.75 % in all)


@dataclass
class Hour:
    requests: int
    errors: int
    cost: float


def seasonal(base: float, hour: datetime, weekly: bool) -> float:
    """Business-hours bump on a night floor; weekends at 35 % when ``weekly``."""
    hod = hour.hour
    day = 0.2 + 0.8 * max(0.0, math.sin(math.pi * (hod - 6) / 14)) if 6 <= hod <= 20 else 0.2
    weekend = 0.35 if weekly and hour.weekday() >= 5 else 1.0
    return base * day * weekend


def series(
    rng: random.Random,
    base: float,
    start: datetime,
    weekly: bool = True,
    until: datetime = THIS_HOUR,
) -> dict:
    out: dict[datetime, Hour] = {}
    hour = start
    while hour <= until:
        n = round(seasonal(base, hour, weekly) * rng.uniform(1 - REQUEST_NOISE, 1 + REQUEST_NOISE))
        cost = n * 0.002 * rng.uniform(1 - COST_NOISE, 1 + COST_NOISE)
        out[hour] = Hour(n, round(n * 0.02 * rng.uniform(0.5, 1.5)), cost)
        hour += timedelta(hours=1)
    return out


def busy_hours(rng: random.Random, k: int, now_hour: datetime = THIS_HOUR) -> list[datetime]:
    """``k`` distinct weekday hours 10:00-16:00 in the scored week, before the current hour."""
    pool = [
        now_hour - timedelta(hours=h)
        for h in range(1, int(SCORED.total_seconds() // 3600))
        if (t := now_hour - timedelta(hours=h)).weekday() < 5 and 10 <= t.hour <= 16
    ]
    return rng.sample(pool, k)


@pytest.fixture
async def tracker(pg_dsn: str, tmp_path: Path) -> AsyncIterator[ModelUsageTracker]:
    t = ModelUsageTracker(pg_dsn, spool_dir=tmp_path, maintenance_interval=3600)
    await t.start()
    try:
        yield t
    finally:
        await t.close()


async def store(pg: asyncpg.Connection, tenant: uuid.UUID, data: dict) -> None:
    await pg.copy_records_to_table(
        "model_usage_tenant_hourly",
        records=[
            (tenant, hour, h.requests, h.errors, Decimal(str(round(h.cost, 6))))
            for hour, h in data.items()
            if h.requests > 0  # an hour without rows has no rollup row
        ],
        columns=["tenant_id", "hour", "requests", "errors", "cost_usd"],
    )


async def test_planted_anomalies_found_with_precision_and_recall(
    pg: asyncpg.Connection, tracker: ModelUsageTracker
) -> None:
    rng = random.Random(20310312)
    planted: set[tuple[uuid.UUID, datetime]] = set()
    clean: list[uuid.UUID] = []
    mine: set[uuid.UUID] = set()
    for i, base in enumerate((40, 80, 150, 300, 60, 120, 500)):
        tenant = uuid.uuid4()
        mine.add(tenant)
        data = series(rng, base, THIS_HOUR - HISTORY)
        if i >= 5:
            clean.append(tenant)
        else:
            spike, drop, burst, pricey = busy_hours(rng, 4)
            h = data[spike]
            data[spike] = Hour(h.requests * 3, h.errors * 3, h.cost * 3)
            data[drop] = Hour(0, 0, 0.0)
            h = data[burst]
            data[burst] = Hour(h.requests, round(h.requests * 0.4), h.cost)
            h = data[pricey]
            data[pricey] = Hour(h.requests, h.errors, h.cost * 4)  # a dearer model
            planted |= {(tenant, spike), (tenant, drop), (tenant, burst), (tenant, pricey)}
            # The current, unfinished hour is never scored, however odd.
            h = data[THIS_HOUR]
            data[THIS_HOUR] = Hour(h.requests * 10, h.requests, h.cost * 10)
        await store(pg, tenant, data)

    # A new tenant (10 days, no weekly pattern yet): the same-hour-of-day fallback.
    young = uuid.uuid4()
    mine.add(young)
    data = series(rng, 100, THIS_HOUR - timedelta(days=10), weekly=False)
    (spike,) = busy_hours(rng, 1)
    h = data[spike]
    data[spike] = Hour(h.requests * 3, h.errors * 3, h.cost * 3)
    planted.add((young, spike))
    await store(pg, young, data)

    found = await tracker.detect_anomalies(since=SCORED, now=NOW)
    found = [a for a in found if a.tenant_id in mine]
    flagged = {(a.tenant_id, a.hour) for a in found}

    assert all(a.hour < THIS_HOUR for a in found)
    assert not any(a.tenant_id in clean for a in found), [a for a in found if a.tenant_id in clean]
    true_positive = len(flagged & planted)
    precision = true_positive / len(flagged)
    recall = true_positive / len(planted)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall, sorted(flagged ^ planted))

    # Each kind is reported under the metric that moved, with the numbers that show it.
    by_key = {(a.tenant_id, a.hour, a.metric): a for a in found}
    metrics = {a.metric for a in found}
    assert metrics == {"requests", "cost", "error_rate"}
    for a in by_key.values():
        assert a.score >= 4.0 and a.expected >= 0
    drops = [a for a in found if a.metric == "requests" and a.observed == 0]
    assert len(drops) == 5  # one per anomalous tenant
    bursts = [a for a in found if a.metric == "error_rate"]
    assert bursts and all(a.observed > 0.3 and a.expected < 0.05 for a in bursts)

    # Baselines precomputed (what maintenance does for the last 8 days) give the same answer,
    # and the detector reads them: a planted spike whose stored baseline is moved up to it
    # is no longer reported.
    saved = await pg.fetch(
        "SELECT key, value FROM llm_gateway_settings WHERE key LIKE 'usage_baselines_covered_%'"
    )
    try:
        await pg.execute(
            "SELECT llm_gateway_compute_usage_baselines($1, $2)",
            THIS_HOUR - SCORED - timedelta(hours=1),
            THIS_HOUR + timedelta(hours=1),
        )
        stored = await pg.fetchval(
            "SELECT count(*) FROM model_usage_tenant_baseline WHERE tenant_id = ANY($1::uuid[])",
            list(mine),
        )
        assert stored >= len(mine) * 24 * 7
        again = [
            a for a in await tracker.detect_anomalies(since=SCORED, now=NOW) if a.tenant_id in mine
        ]
        assert again == found
        moved = next(a for a in found if a.metric == "requests" and a.observed > a.expected)
        await pg.execute(
            "UPDATE model_usage_tenant_baseline SET req_median = $3"
            " WHERE tenant_id = $1 AND hour = $2",
            moved.tenant_id,
            moved.hour,
            moved.observed,
        )
        after = await tracker.detect_anomalies(since=SCORED, tenant_id=moved.tenant_id, now=NOW)
        assert (moved.hour, "requests") not in {(a.hour, a.metric) for a in after}
    finally:
        await pg.execute(
            "DELETE FROM model_usage_tenant_baseline WHERE hour >= $1", THIS_HOUR - HISTORY
        )
        for r in saved:
            await pg.execute("SELECT llm_gateway_set_setting($1, $2)", r["key"], r["value"])


async def test_one_tenant_and_min_score(pg: asyncpg.Connection, tracker: ModelUsageTracker) -> None:
    rng = random.Random(7)
    tenant, other = uuid.uuid4(), uuid.uuid4()
    for t in (tenant, other):
        data = series(rng, 200, THIS_HOUR - HISTORY)
        (spike,) = busy_hours(rng, 1)
        h = data[spike]
        data[spike] = Hour(h.requests * 3, h.errors, h.cost * 3)
        await store(pg, t, data)
    only = await tracker.detect_anomalies(since=SCORED, tenant_id=tenant, now=NOW)
    assert only and {a.tenant_id for a in only} == {tenant}
    assert (
        await tracker.detect_anomalies(since=SCORED, tenant_id=tenant, min_score=1000, now=NOW)
        == []
    )


async def test_tenant_too_young_is_not_scored(
    pg: asyncpg.Connection, tracker: ModelUsageTracker
) -> None:
    tenant = uuid.uuid4()
    data = series(random.Random(3), 200, THIS_HOUR - timedelta(hours=30), weekly=False)
    await store(pg, tenant, data)
    # Under three days of history: no baseline, nothing reported (rather than noise).
    assert await tracker.detect_anomalies(since=SCORED, tenant_id=tenant, now=NOW) == []


# --- stored scores (migration 012) --------------------------------------------------------------


def _key(a: Anomaly) -> tuple[object, ...]:
    return (a.tenant_id, a.hour, a.metric, a.observed, a.expected, a.score)


async def test_stored_scores_answer_as_computed_ones(pg: asyncpg.Connection, pg_dsn: str) -> None:
    """Maintenance stores the scores of the hours it refreshes; the detector then reads them
    (the same answer as computing them), and computes what they cannot answer."""
    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    since = this_hour - SCORED
    rng = random.Random(12)
    mine: list[uuid.UUID] = []
    for base in (60, 200, 400):
        tenant = uuid.uuid4()
        mine.append(tenant)
        data = series(rng, base, this_hour - HISTORY, until=this_hour)
        spike, pricey = busy_hours(rng, 2, this_hour)
        h = data[spike]
        data[spike] = Hour(h.requests * 3, h.errors * 3, h.cost * 3)
        h = data[pricey]
        data[pricey] = Hour(h.requests, h.errors, h.cost * 4)
        await store(pg, tenant, data)
    saved = await pg.fetch(
        "SELECT key, value FROM llm_gateway_settings WHERE key LIKE 'usage_anomaly_scores_%'"
        " OR key LIKE 'usage_baselines_covered_%'"
    )
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    assert pool is not None

    async def computed(min_score: float) -> list[tuple[object, ...]]:
        rows = await pg.fetch(
            "SELECT * FROM llm_gateway_usage_anomalies_computed($1, NULL, $2, 5, $3)"
            " WHERE tenant_id = ANY($4::uuid[])",
            since, min_score, this_hour, mine,
        )  # fmt: skip
        return [tuple(r) for r in rows]

    async def detected(**kwargs: Any) -> list[tuple[object, ...]]:
        found = await detect_anomalies(pool, since=since, now=this_hour, **kwargs)
        return [_key(a) for a in found if a.tenant_id in mine]

    try:
        # What a maintenance run does for the hours it refreshes: baselines, then scores.
        await pg.execute("SELECT llm_gateway_compute_usage_baselines($1, $2)", since, this_hour)
        want = await computed(4.0)
        assert len({a[1] for a in want}) >= 6  # both planted hours of each tenant, at least
        await pg.execute("SELECT llm_gateway_score_usage_hours($1, $2)", since, this_hour)
        assert await detected() == want

        # The detector reads the stored scores: one lowered there is no longer reported ...
        first = want[0]
        await pg.execute(
            "UPDATE model_usage_anomaly_scores SET score = 0"
            " WHERE tenant_id = $1 AND hour = $2 AND metric = $3",
            *first[:3],
        )
        assert await detected() == want[1:]
        assert await detected(tenant_id=first[0]) == [a for a in want[1:] if a[0] == first[0]]
        # ... and a min_score below the stored floor (2) is computed: it is back.
        assert await detected(min_score=1.5) == await computed(1.5)
    finally:
        await pool.close()
        for table in ("model_usage_anomaly_scores", "model_usage_tenant_baseline",
                      "model_usage_tenant_hourly"):  # fmt: skip
            await pg.execute(f"DELETE FROM {table} WHERE tenant_id = ANY($1::uuid[])", mine)
        for r in saved:
            await pg.execute("SELECT llm_gateway_set_setting($1, $2)", r["key"], r["value"])


# --- the scheduled check: NOTIFY once per new anomaly ----------------------------------------

_NOTIFY_CHILD = """
import asyncio, sys
import asyncpg

async def main() -> None:
    conn = await asyncpg.connect(sys.argv[1])
    try:
        await conn.execute(sys.argv[2])
    finally:
        await conn.close()

asyncio.run(main())
"""


async def _in_process(dsn: str, sql: str) -> None:
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", _NOTIFY_CHILD, dsn, sql)
    assert await child.wait() == 0


async def test_maintenance_notifies_each_new_anomaly_once(
    pg: asyncpg.Connection, pg_dsn: str
) -> None:
    """Real raw rows, real hours: a tenant seen 4 days ago at this time with 10 requests an
    hour, then 60 two hours ago. Maintenance (and the check run from other processes at once)
    announces that hour's requests and cost anomalies once each."""
    tenant = uuid.uuid4()
    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    spike = this_hour - timedelta(hours=2)
    batches = [(spike - timedelta(days=d), 10) for d in range(1, 5)] + [(spike, 60)]
    for hour, n in batches:
        await pg.execute(
            "INSERT INTO model_usage_stats (id, tenant_id, provider, model_name, latency_ms,"
            ' input_tokens, output_tokens, estimated_cost_usd, status, "timestamp")'
            " SELECT gen_random_uuid(), $1, 'openai', 'notify-test', 100, 10, 10, 0.01,"
            " 'success', $2::timestamptz + i * interval '1 second'"
            " FROM generate_series(1, $3) AS i",
            tenant,
            hour,
            n,
        )
    await pg.execute(
        "SELECT llm_gateway_refresh_usage_hourly($1, $2)",
        spike - timedelta(days=4),
        this_hour + timedelta(hours=1),
    )

    received: list[dict[str, object]] = []
    listener = await asyncpg.connect(pg_dsn)
    try:
        await listener.add_listener(
            "llm_gateway_events", lambda *args: received.append(json.loads(args[3]))
        )
        maintain = "SELECT * FROM llm_gateway_maintain_usage()"
        check = "SELECT llm_gateway_notify_usage_anomalies()"
        await pg.fetchrow(maintain)
        await asyncio.gather(
            _in_process(pg_dsn, check), _in_process(pg_dsn, check), _in_process(pg_dsn, maintain)
        )
        await pg.fetchrow(maintain)
        await asyncio.sleep(0.5)  # notifications are delivered after each COMMIT
    finally:
        await listener.close()

    mine = [e for e in received if e.get("tenant_id") == str(tenant)]
    assert sorted(str(e["metric"]) for e in mine) == ["cost", "requests"], received
    for event in mine:
        assert event["type"] == "usage_anomaly"
        assert datetime.fromisoformat(str(event["hour"])) == spike
    requests = next(e for e in mine if e["metric"] == "requests")
    assert (requests["observed"], requests["expected"]) == (60, 10)
