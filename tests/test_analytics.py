"""Usage analytics: sessions and tags, monthly usage (Python, views, psql files), the rollups
of migration 008. Recommendations: test_analytics_recommend.py."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from llm_gateway import InvalidRequestError, TenantLLMRouter, provider_settings
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import make_tenant
from usage import ModelUsageTracker
from usage.analytics.labels import InvalidLabelError, labels_from, validate_tags
from usage.analytics.monthly import parse_month
from usage.spool_codec import decode_row, encode_row, loads
from usage.writer import unnest_upsert_rows

MSG = [{"role": "user", "content": "hello"}]
MONITORING = Path(__file__).resolve().parent.parent / "sql" / "monitoring"


@pytest.fixture
async def tracker(pg_dsn: str, tmp_path: Path) -> AsyncIterator[ModelUsageTracker]:
    t = ModelUsageTracker(pg_dsn, spool_dir=tmp_path, maintenance_interval=3600)
    await t.start()
    try:
        yield t
    finally:
        await t.close()


# --- sessions and tags ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("session", "tags", "field"),
    [
        ("", None, "session_id"),
        ("x" * 129, None, "session_id"),
        ("has space", None, "session_id"),
        (42, None, "session_id"),
        (None, "one-string", "tags"),
        (None, ["ok", ""], "tags"),
        (None, ["bad tag"], "tags"),
        (None, ["t" * 65], "tags"),
        (None, [f"t{i}" for i in range(17)], "tags"),
        (None, [1], "tags"),
    ],
)
def test_invalid_labels_name_the_field(session: object, tags: object, field: str) -> None:
    with pytest.raises(InvalidLabelError) as info:
        labels_from(session, tags, None)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")


def test_labels_from_arguments_else_metadata() -> None:
    meta = {"session_id": "s-1", "tags": ["a", "b", "a"]}
    assert labels_from(None, None, meta) == ("s-1", ["a", "b"])
    assert labels_from("s-2", ("c",), meta) == ("s-2", ["c"])
    assert validate_tags([]) is None


async def test_router_stores_session_and_tags_as_columns(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    sim = SimulatedProvider(name="llm7")
    await sim.start()
    try:
        tenant = await make_tenant(
            pg, llm_tokens={"llm7": "k-1"}, inference_config={"preferred_provider": "llm7"}
        )
        providers = {"llm7": provider_settings("llm7", sim.base_url)}
        async with TenantLLMRouter(pg_dsn, providers=providers) as router:
            await router.complete_for_tenant(tenant, MSG, session_id="chat-1", tags=["beta", "x"])
            await router.complete_for_tenant(
                tenant, MSG, metadata={"session_id": "chat-2", "tags": ["from-meta"]}
            )
            stream = await router.stream_for_tenant(tenant, MSG, session_id="chat-3")
            async with stream:
                async for _ in stream:
                    pass
            seen = len(sim.keys_seen())
            with pytest.raises(InvalidRequestError) as info:
                await router.complete_for_tenant(tenant, MSG, tags=["no spaces please"])
            assert info.value.parameter == "tags"
            assert len(sim.keys_seen()) == seen  # refused before anything was sent
    finally:
        await sim.close()
    rows = await pg.fetch(
        'SELECT session_id, tags FROM model_usage_stats WHERE tenant_id = $1 ORDER BY "timestamp"',
        tenant,
    )
    assert [(r["session_id"], r["tags"]) for r in rows] == [
        ("chat-1", ["beta", "x"]),
        ("chat-2", ["from-meta"]),
        ("chat-3", None),
    ]


async def test_session_and_tags_survive_spool_and_unnest_paths(
    pg: asyncpg.Connection, tracker: ModelUsageTracker
) -> None:
    tenant = uuid.uuid4()
    rec = tracker.make_record(
        tenant_id=tenant, provider="openai", model_name="gpt-4o", endpoint="/e", latency_ms=5,
        input_tokens=1, output_tokens=1, session_id="s:1", tags=["team=ml", "a/b"],
    )  # fmt: skip
    back = decode_row(loads(encode_row(rec)))
    assert (back.session_id, back.tags) == ("s:1", ["team=ml", "a/b"])
    # The unnest path quotes array elements itself: a row built by hand may hold anything.
    rec = dataclasses.replace(rec, tags=['q"uote', "back\\slash", "com,ma", "{}"])
    # A spool line written before 008 (no such keys) still replays.
    old = {k: v for k, v in loads(encode_row(rec)).items() if k not in ("session_id", "tags")}
    assert decode_row(old).tags is None
    assert await unnest_upsert_rows(pg, [rec], timeout=10) == 1
    row = await pg.fetchrow("SELECT session_id, tags FROM model_usage_stats WHERE id = $1", rec.id)
    assert row is not None and (row["session_id"], row["tags"]) == ("s:1", rec.tags)


# --- monthly usage -------------------------------------------------------------------------


def test_parse_month() -> None:
    assert parse_month("2031-02") == date(2031, 2, 1)
    assert parse_month(date(2031, 2, 17)) == date(2031, 2, 1)
    assert parse_month(None, now=datetime(2031, 12, 31, 23, tzinfo=UTC)) == date(2031, 12, 1)
    for bad in ("2031-13", "31-02", "february"):
        with pytest.raises(ValueError, match="YYYY-MM"):
            parse_month(bad)


def _psql(dsn: str, name: str, **variables: str) -> list[list[str]]:
    args = ["psql", dsn, "-X", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=1"]
    for key, value in variables.items():
        args += ["-v", f"{key}={value}"]
    out = subprocess.run(
        [*args, "-f", str(MONITORING / name)], capture_output=True, text=True, check=True,
        env={**os.environ, "PGTZ": "Asia/Tokyo"},  # months are UTC whatever the session zone
    ).stdout  # fmt: skip
    return [line.split("|") for line in out.splitlines() if line]


async def test_monthly_usage_per_tenant_and_user(
    pg_dsn: str, pg: asyncpg.Connection, tracker: ModelUsageTracker
) -> None:
    tenant = uuid.uuid4()
    this_month = parse_month(None)
    last_day_before = datetime.combine(this_month, datetime.min.time(), UTC) - timedelta(seconds=1)
    start = datetime.combine(this_month, datetime.min.time(), UTC) + timedelta(minutes=1)
    rows = [
        # (user, provider, model, in, out, status, when)
        ("alice", "openai", "gpt-4o", 1000, 100, "success", start),
        ("alice", "openai", "gpt-4o", 2000, 300, "success", start + timedelta(hours=1)),
        ("alice", "openai", "gpt-4o", None, None, "rate_limit", start + timedelta(hours=1)),
        ("bob", "groq", "llama-3.1-8b-instant", 500, 50, "success", start),
        (None, "openai", "gpt-4o-mini", 100, 10, "error", start),
        ("alice", "openai", "gpt-4o", 9999, 9999, "success", last_day_before),  # last month
    ]
    for user, provider, model, tin, tout, status, when in rows:
        await tracker.track_request(
            tenant_id=tenant, provider=provider, model_name=model, endpoint="/chat",
            latency_ms=100, input_tokens=tin, output_tokens=tout, status=status,
            user_id=user, timestamp=when,
        )  # fmt: skip
    assert await tracker.flush(timeout=30)
    await pg.execute(
        "SELECT llm_gateway_refresh_usage_hourly($1, $2)",
        last_day_before - timedelta(hours=1),
        start + timedelta(hours=2),
    )
    gpt4o = Decimal("2.50") * 3000 / 10**6 + Decimal("10.00") * 400 / 10**6

    month = await tracker.get_monthly_usage(tenant)
    assert month.month == this_month and month.user_id is None
    assert (month.requests, month.errors, month.input_tokens, month.output_tokens) == (
        5, 2, 3600, 460,
    )  # fmt: skip
    by = {(m.provider, m.model_name): m for m in month.by_model}
    assert by[("openai", "gpt-4o")].cost_usd == gpt4o
    assert (by[("openai", "gpt-4o")].requests, by[("openai", "gpt-4o")].errors) == (3, 1)
    assert by[("openai", "gpt-4o-mini")].errors == 1

    alice = await tracker.get_monthly_usage(tenant, this_month.strftime("%Y-%m"), user_id="alice")
    assert (alice.requests, alice.errors, alice.cost_usd) == (3, 1, gpt4o)
    earlier = await tracker.get_monthly_usage(tenant, last_day_before.date(), user_id="alice")
    assert (earlier.requests, earlier.input_tokens) == (1, 9999)

    # The views and the psql files give the same numbers.
    view = await pg.fetch(
        "SELECT provider, model_name, requests, cost_usd, errors FROM tenant_monthly_usage"
        " WHERE tenant_id = $1 AND month = $2 ORDER BY provider, model_name",
        tenant,
        this_month,
    )
    assert [(r["provider"], r["model_name"], r["requests"], r["errors"]) for r in view] == sorted(
        (m.provider, m.model_name, m.requests, m.errors) for m in month.by_model
    )
    user_view = await pg.fetchrow(
        "SELECT sum(requests) AS n, sum(cost_usd) AS c FROM tenant_user_monthly_usage"
        " WHERE tenant_id = $1 AND user_id = 'alice' AND month = $2",
        tenant,
        this_month,
    )
    assert user_view is not None and (user_view["n"], user_view["c"]) == (3, gpt4o)
    by_file = _psql(pg_dsn, "tenant_monthly_usage.sql", tenant_id=str(tenant))
    assert {(r[0], r[1], int(r[2])) for r in by_file} == {
        (m.provider, m.model_name, m.requests) for m in month.by_model
    }
    user_file = _psql(pg_dsn, "tenant_user_monthly_usage.sql", tenant_id=str(tenant), user_id="bob")
    assert [(r[0], r[1], int(r[2])) for r in user_file] == [("groq", "llama-3.1-8b-instant", 1)]


async def test_rollups_follow_late_and_vanished_rows(
    pg: asyncpg.Connection, tracker: ModelUsageTracker
) -> None:
    tenant = uuid.uuid4()
    # An hour whose monthly partition exists: rows in the default partition would make the
    # tracker's start-up maintenance create one, under locks our refresh would then wait on.
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=30)
    for i in range(3):
        await tracker.track_request(
            tenant_id=tenant, provider="openai", model_name="gpt-4o", endpoint="/e",
            latency_ms=10, input_tokens=10, output_tokens=10, user_id="u",
            status="success" if i else "error", timestamp=hour + timedelta(minutes=i),
        )  # fmt: skip
    assert await tracker.flush(timeout=30)
    refresh = "SELECT llm_gateway_refresh_usage_hourly($1, $2)"
    await pg.execute(refresh, hour, hour + timedelta(hours=1))
    series = "SELECT requests, errors FROM model_usage_tenant_hourly WHERE tenant_id = $1"
    assert tuple(await pg.fetchrow(series, tenant) or ()) == (3, 1)
    await pg.execute(
        "DELETE FROM model_usage_stats WHERE tenant_id = $1 AND status = 'error'", tenant
    )
    await pg.execute(refresh, hour, hour + timedelta(hours=1))
    assert tuple(await pg.fetchrow(series, tenant) or ()) == (2, 0)
    users = "SELECT sum(requests) FROM model_usage_user_daily WHERE tenant_id = $1"
    assert await pg.fetchval(users, tenant) == 2
    await pg.execute("DELETE FROM model_usage_stats WHERE tenant_id = $1", tenant)
    await pg.execute(refresh, hour, hour + timedelta(hours=1))
    assert await pg.fetchrow(series, tenant) is None and await pg.fetchval(users, tenant) is None


async def test_session_and_tag_files(
    pg_dsn: str, pg: asyncpg.Connection, tracker: ModelUsageTracker
) -> None:
    tenant = uuid.uuid4()
    now = datetime.now(UTC) - timedelta(minutes=5)
    for i in range(30):
        await tracker.track_request(
            tenant_id=tenant, provider="openai", model_name="gpt-4o", endpoint="/e",
            latency_ms=10, input_tokens=1000 * (i % 3 + 1), output_tokens=0,
            session_id=f"s{i % 3}", tags=["all", f"t{i % 2}"], timestamp=now,
        )  # fmt: skip
    assert await tracker.flush(timeout=30)
    top = _psql(pg_dsn, "top_sessions_week.sql", tenant_id=str(tenant))
    assert [(r[0], int(r[1]), Decimal(r[2])) for r in top] == [
        ("s2", 10, Decimal("0.075000")),
        ("s1", 10, Decimal("0.050000")),
        ("s0", 10, Decimal("0.025000")),
    ]
    one = _psql(pg_dsn, "session_cost.sql", tenant_id=str(tenant), session_id="s1")
    # Tag spend is served from a rollup: what maintenance refreshes every few minutes.
    await pg.execute(
        "SELECT llm_gateway_refresh_usage_hourly($1, $2)", now - timedelta(hours=1), now
    )
    assert (one[0][0], int(one[0][1]), Decimal(one[0][4])) == ("s1", 10, Decimal("0.050000"))
    tags = {(r[1], int(r[2]), Decimal(r[3])) for r in _psql(pg_dsn, "tag_spend_daily.sql",
                                                           tenant_id=str(tenant))}  # fmt: skip
    assert tags == {
        ("all", 30, Decimal("0.150000")),
        ("t0", 15, Decimal("0.075000")),  # i even: s0, s2, s1, s0, s2, ... 1000/3000/2000 ...
        ("t1", 15, Decimal("0.075000")),
    }
