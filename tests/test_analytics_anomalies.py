"""The anomaly detector (llm_gateway_usage_anomalies, via tracker.detect_anomalies) on generated
hourly series with weekly seasonality, bounded noise and planted anomalies.

The series go straight into model_usage_tenant_hourly, the detector's input (the refresh that
fills it from raw rows is tested in test_analytics.py); six weeks of hours for a handful of
tenants would be hundreds of thousands of raw rows.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from usage import ModelUsageTracker

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


def series(rng: random.Random, base: float, start: datetime, weekly: bool = True) -> dict:
    out: dict[datetime, Hour] = {}
    hour = start
    while hour <= THIS_HOUR:
        n = round(seasonal(base, hour, weekly) * rng.uniform(1 - REQUEST_NOISE, 1 + REQUEST_NOISE))
        cost = n * 0.002 * rng.uniform(1 - COST_NOISE, 1 + COST_NOISE)
        out[hour] = Hour(n, round(n * 0.02 * rng.uniform(0.5, 1.5)), cost)
        hour += timedelta(hours=1)
    return out


def busy_hours(rng: random.Random, k: int) -> list[datetime]:
    """``k`` distinct weekday hours 10:00-16:00 in the scored week, before the current hour."""
    pool = [
        THIS_HOUR - timedelta(hours=h)
        for h in range(1, int(SCORED.total_seconds() // 3600))
        if (t := THIS_HOUR - timedelta(hours=h)).weekday() < 5 and 10 <= t.hour <= 16
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
