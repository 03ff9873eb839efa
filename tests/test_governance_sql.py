"""Governance SQL: spend counters fed by usage rows, and leases shared between processes."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg


async def _insert(conn: asyncpg.Connection, rows: list[tuple[Any, ...]], *, copy: bool) -> None:
    columns = [
        "id",
        "tenant_id",
        "user_id",
        "provider",
        "model_name",
        "latency_ms",
        "estimated_cost_usd",
        "status",
        "timestamp",
        "key_source",
    ]
    if copy:
        await conn.copy_records_to_table("model_usage_stats", records=rows, columns=columns)
    else:
        await conn.executemany(
            "INSERT INTO model_usage_stats (id, tenant_id, user_id, provider, model_name,"
            " latency_ms, estimated_cost_usd, status, timestamp, key_source)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
            rows,
        )


def _row(
    tenant: uuid.UUID,
    cost: str | None,
    ts: datetime,
    user: str | None = None,
    source: str = "tenant",
) -> tuple[Any, ...]:
    return (
        uuid.uuid4(),
        tenant,
        user,
        "groq",
        "m",
        5,
        None if cost is None else Decimal(cost),
        "success",
        ts,
        source,
    )


async def _spend(conn: asyncpg.Connection, tenant: uuid.UUID, subject: str, grain: str) -> Decimal:
    value = await conn.fetchval(
        "SELECT coalesce(sum(cost_usd), 0) FROM usage_spend_counters"
        " WHERE tenant_id = $1 AND subject = $2 AND grain = $3",
        tenant,
        subject,
        grain,
    )
    return Decimal(value)


async def test_counters_follow_inserted_rows_only(pg: asyncpg.Connection) -> None:
    tenant = uuid.uuid4()
    ts = datetime(2026, 12, 3, 7, 59, 30, tzinfo=UTC)
    rows = [
        _row(tenant, "0.100000", ts, user="alice"),
        _row(tenant, "0.250000", ts + timedelta(minutes=1), user="bob", source="system"),
        _row(tenant, None, ts),  # unpriced: not spend
        _row(tenant, "0.000000", ts),
    ]
    await _insert(pg, rows[:2], copy=True)  # the writer's fresh-batch path
    # A replay of the same rows plus a new one: only the new one counts.
    rows.append(_row(tenant, "1.000000", ts - timedelta(days=40)))
    await _insert(pg, rows, copy=False)
    assert await _spend(pg, tenant, "", "M") == Decimal("1.35")
    assert await _spend(pg, tenant, "", "d") == Decimal("1.35")
    assert await _spend(pg, tenant, "s", "h") == Decimal("0.25")
    hours = await pg.fetch(
        "SELECT bucket, cost_usd FROM usage_spend_counters"
        " WHERE tenant_id = $1 AND subject = '' AND grain = 'h' ORDER BY bucket",
        tenant,
    )
    # 07:59:30 and 08:00:30 fall in two hours; the row 40 days back in a third.
    hour = ts.replace(minute=0, second=0)
    assert [(r["bucket"], r["cost_usd"]) for r in hours] == [
        (hour - timedelta(days=40), Decimal("1.000000")),
        (hour, Decimal("0.100000")),
        (hour + timedelta(hours=1), Decimal("0.250000")),
    ]
    assert (
        await pg.fetchval(
            "SELECT count(*) FROM usage_spend_counters WHERE tenant_id = $1 AND subject LIKE 'u:%'",
            tenant,
        )
        == 0
    )


async def _renew(
    conn: asyncpg.Connection, holder: uuid.UUID, *reqs: dict[str, Any], ttl: float = 10.0
) -> dict[str, dict[str, float]]:
    out = json.loads(
        await conn.fetchval(
            "SELECT llm_gateway_quota_renew($1, $2, $3::jsonb)::text", holder, ttl, json.dumps(reqs)
        )
    )
    return {r["key"]: r for r in out}


def _budget(key: str, tenant: uuid.UUID, want: float, limit: float = 1.0) -> dict[str, Any]:
    return {
        "key": key,
        "kind": "budget",
        "limit": limit,
        "tenant_id": str(tenant),
        "subject": "",
        "grain": "M",
        "start": "2026-12-01T00:00:00Z",
        "end": "2027-01-01T00:00:00Z",
        "want": want,
    }


def _rate(
    key: str, want: float, uses: list[list[float]] | None = None, limit: float = 10
) -> dict[str, Any]:
    return {
        "key": key,
        "kind": "rate",
        "limit": limit,
        "window_s": 60,
        "bucket_s": 1,
        "want": want,
        "uses": uses or [],
    }


async def test_budget_leases_share_what_rows_left(pg: asyncpg.Connection) -> None:
    tenant = uuid.uuid4()
    key = f"t:{tenant}:budget"
    await _insert(pg, [_row(tenant, "0.300000", datetime(2026, 12, 2, tzinfo=UTC))], copy=True)
    a, b = uuid.uuid4(), uuid.uuid4()
    got = await _renew(pg, a, _budget(key, tenant, 0.5))
    assert got[key]["granted"] == 0.5 and got[key]["committed"] == 0.3
    got = await _renew(pg, b, _budget(key, tenant, 0.5))
    assert abs(got[key]["granted"] - 0.2) < 1e-9 and got[key]["others"] == 0.5
    # A renews for less: its lease is replaced, not added to.
    assert (await _renew(pg, a, _budget(key, tenant, 0.1)))[key]["granted"] == 0.1
    assert abs((await _renew(pg, b, _budget(key, tenant, 0.9)))[key]["granted"] - 0.6) < 1e-9
    assert await pg.fetchval("SELECT llm_gateway_quota_release($1)", a) == 1
    assert await pg.fetchval("SELECT count(*) FROM quota_leases WHERE limit_key = $1", key) == 1


async def test_rate_leases_reconcile_uses_and_expire(pg: asyncpg.Connection) -> None:
    key = f"t:{uuid.uuid4()}:rpm"
    a, b = uuid.uuid4(), uuid.uuid4()
    assert (await _renew(pg, a, _rate(key, 6)))[key]["granted"] == 6
    assert (await _renew(pg, b, _rate(key, 6)))[key]["granted"] == 4
    now = datetime.now(UTC).timestamp()
    # A used 2 of its 6 slots and wants to hold 4 again: 10 - 2 used - 4 (B) = 4.
    got = await _renew(pg, a, _rate(key, 4, [[now, 2]]))
    assert (got[key]["granted"], got[key]["committed"], got[key]["others"]) == (4, 2, 4)
    # B stops renewing; once its lease expired, its 4 slots count as used when granted.
    await _renew(pg, b, _rate(key, 4), ttl=0.001)
    await asyncio.sleep(0.05)
    got = await _renew(pg, a, _rate(key, 10))
    assert (got[key]["committed"], got[key]["others"], got[key]["granted"]) == (6, 0, 4)
    # Uses older than the window stop counting.
    old = now - 3600
    await _renew(pg, a, _rate(key, 0, [[old, 50]]))
    assert (await _renew(pg, a, _rate(key, 10)))[key]["committed"] == 6


async def test_concurrent_renewals_never_grant_more_than_the_limit(pg_dsn: str) -> None:
    key = f"t:{uuid.uuid4()}:rpm"
    conns = [await asyncpg.connect(pg_dsn) for _ in range(8)]
    try:
        got = await asyncio.gather(
            *(_renew(c, uuid.uuid4(), _rate(key, 3, limit=10)) for c in conns)
        )
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    granted = sorted(g[key]["granted"] for g in got)
    assert sum(granted) == 10
    assert granted.count(3) == 3 and granted.count(0) >= 4


async def test_a_keys_spend_is_read_from_its_rows_and_counted_per_key(
    pg: asyncpg.Connection,
) -> None:
    """Migration 011: a key's sub-hour budget reads only that key's rows; the counters keep
    one subject per key next to the tenant's."""
    from llm_gateway.governance.keys import KeyQuota
    from llm_gateway.governance.limits import budget_request, key_specs

    tenant = uuid.uuid4()
    at = datetime(2026, 12, 2, 10, 30, 15, tzinfo=UTC)
    for key_id, cost in (("ka", "0.100000"), ("ka", "0.050000"), ("kb", "0.200000"), (None, "1")):
        await pg.execute(
            "INSERT INTO model_usage_stats (id, tenant_id, provider, model_name, latency_ms,"
            " estimated_cost_usd, status, timestamp, virtual_key_id)"
            " VALUES ($1, $2, 'groq', 'm', 5, $3, 'success', $4, $5)",
            uuid.uuid4(),
            tenant,
            Decimal(cost),
            at,
            key_id,
        )
    (spec,) = key_specs(tenant, "ka", KeyQuota("ka", {"max_usd": 1.0, "period": "1m"}).parsed())
    request = budget_request(spec, spec.bounds(at), 0.5)
    assert request["source"] == "rows" and request["virtual_key_id"] == "ka"
    got = await _renew(pg, uuid.uuid4(), request)
    assert abs(got[request["key"]]["committed"] - 0.15) < 1e-9
    assert await _spend(pg, tenant, "k:ka", "h") == Decimal("0.15")
    assert await _spend(pg, tenant, "k:kb", "d") == Decimal("0.2")
    assert await _spend(pg, tenant, "", "M") == Decimal("1.35")
