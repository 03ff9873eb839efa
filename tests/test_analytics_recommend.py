"""Model-switch recommendations (``tracker.recommend_models``, ``models_by_endpoint.sql``).

These read every tenant's success rates (a candidate without data of its own tenant is judged
by all tenants'), so they run on a database of their own: rows other test modules leave in the
session database would change which candidates qualify.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import scratch_database
from tests.test_analytics import _psql
from usage import ModelUsageTracker
from usage.analytics.recommend import CandidateModel


@pytest.fixture(scope="module")
def own_dsn() -> Iterator[str]:
    with scratch_database("recommend") as dsn:
        yield dsn


@pytest.fixture
async def pg(own_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(own_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def tracker(own_dsn: str, tmp_path: Path) -> AsyncIterator[ModelUsageTracker]:
    t = ModelUsageTracker(own_dsn, spool_dir=tmp_path, maintenance_interval=3600)
    await t.start()
    try:
        yield t
    finally:
        await t.close()


async def test_recommendations(
    own_dsn: str, pg: asyncpg.Connection, tracker: ModelUsageTracker
) -> None:
    tenant, others = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC) - timedelta(minutes=5)

    async def rows(t: uuid.UUID, provider: str, model: str, n: int, ok: int, tin: int) -> None:
        for i in range(n):
            await tracker.track_request(
                tenant_id=t, provider=provider, model_name=model, endpoint="/summarise",
                latency_ms=100 + i, input_tokens=tin, output_tokens=200,
                status="success" if i < ok else "error", timestamp=now - timedelta(hours=i),
            )  # fmt: skip

    await rows(tenant, "openai", "gpt-4o", 100, 98, 3000)
    await rows(others, "groq", "llama-3.3-70b-versatile", 50, 30, 100)  # unreliable elsewhere
    assert await tracker.flush(timeout=30)
    await pg.execute(
        "SELECT llm_gateway_refresh_usage_hourly($1, $2)", now - timedelta(days=5), now
    )
    candidates = [
        CandidateModel("openai", "gpt-4o", 128_000),  # the current one
        CandidateModel("openai", "gpt-4o-mini", 128_000),  # cheaper, fits, no data: listed
        CandidateModel("groq", "llama-3.1-8b-instant", 2_000),  # too small a window
        CandidateModel("groq", "llama-3.3-70b-versatile", 131_072),  # 60 % success elsewhere
        CandidateModel("local", "mystery", 1_000_000),  # priced (local: free) but no window?
        CandidateModel("openrouter", "unknown-model", 1_000_000),  # no known price
        CandidateModel("llm7", "gpt-4-turbo", 128_000),  # dearer
    ]
    in_use, recs = await tracker.recommend_models(tenant, candidates)
    (use,) = in_use
    assert (use.endpoint, use.model_name, use.requests, use.success_rate) == (
        "/summarise", "gpt-4o", 100, 0.98,
    )  # fmt: skip
    # Latencies 100..197 ms on the successes: p50 148.5, p95 192.15; the rollup's histogram
    # (buckets 15 % wide) gives them within 7.5 %.
    assert use.p50_latency_ms is not None and use.p95_latency_ms is not None
    assert abs(use.p50_latency_ms / 148.5 - 1) <= 0.075
    assert abs(use.p95_latency_ms / 192.15 - 1) <= 0.075
    (by_file,) = _psql(own_dsn, "models_by_endpoint.sql", tenant_id=str(tenant))
    assert by_file[:4] == ["/summarise", "openai", "gpt-4o", "100"]
    assert Decimal(by_file[5]) == Decimal("0.98")
    assert float(by_file[6]) == pytest.approx(use.p50_latency_ms, abs=0.05)
    current = (Decimal("2.50") * 3000 + Decimal("10.00") * 200) * 100 / 10**6
    assert use.cost_usd == current and use.cost_per_1k_requests == current * 10
    assert [(r.provider, r.model) for r in recs] == [
        ("local", "mystery"),
        ("openai", "gpt-4o-mini"),
    ]
    mini = recs[1]
    projected = (Decimal("0.15") * 3000 + Decimal("0.60") * 200) * 98 / 10**6
    assert mini.projected_cost_usd == projected
    assert mini.monthly_saving_usd == (current - projected).quantize(Decimal("0.01"))
    assert mini.success_basis == "none" and mini.success_rate is None


async def test_equal_savings_are_ordered_by_name(
    pg: asyncpg.Connection, tracker: ModelUsageTracker
) -> None:
    """Two models of one endpoint whose savings round to the same cent: the order is by name,
    not by whatever order the rows came in (here the dearer one, tie-b, comes first)."""
    tenant = uuid.uuid4()
    now = datetime.now(UTC) - timedelta(minutes=5)
    await pg.execute(
        """
        INSERT INTO model_usage_stats (id, tenant_id, provider, model_name, endpoint,
            input_tokens, output_tokens, latency_ms, estimated_cost_usd, status, "timestamp")
        SELECT gen_random_uuid(), $1, 'openai', m, '/e', 1000, 100, 100,
               CASE WHEN m = 'tie-b' AND g = 1 THEN 0.050001 ELSE 0.05 END, 'success',
               $2::timestamptz - g * interval '1 minute'
        FROM generate_series(1, 20) AS g, unnest(ARRAY['tie-a', 'tie-b']) AS m
        """,
        tenant,
        now,
    )
    await pg.execute(
        "SELECT llm_gateway_refresh_usage_hourly($1, $2)", now - timedelta(hours=1), now
    )
    candidates = [
        CandidateModel("openai", "gpt-4o-mini", 128_000),
        CandidateModel("groq", "llama-3.1-8b-instant", 131_072),
    ]
    in_use, recs = await tracker.recommend_models(tenant, candidates)
    assert [u.model_name for u in in_use] == ["tie-b", "tie-a"]  # dearer first
    # Every saving is $1.00 once rounded (0.9958 to 0.998841): by current model, candidate.
    assert {r.monthly_saving_usd for r in recs} == {Decimal("1.00")}
    assert [(r.current.model_name, r.provider, r.model) for r in recs] == [
        ("tie-a", "groq", "llama-3.1-8b-instant"),
        ("tie-a", "openai", "gpt-4o-mini"),
        ("tie-b", "groq", "llama-3.1-8b-instant"),
        ("tie-b", "openai", "gpt-4o-mini"),
    ]
