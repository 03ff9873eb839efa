"""``llm-gateway quota show``, run as a real process against the test database."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from typing import Any

import asyncpg
import pytest

from llm_gateway import TenantLLMRouter, provider_settings
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import make_tenant
from tests.test_cli import ENV, ROOT, TIMEOUT, _command, assert_one_line_error

MSG = [{"role": "user", "content": "hello there"}]
PRICEY = "pricey-model"  # $1,000 per million tokens: a request costs cents
COLUMNS = ["scope", "limit", "allowed", "used", "reserved", "remaining", "resets_at"]


def quota(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    # Provider keys of the environment play no part: the command only reads quotas.
    env = {k: v for k, v in ENV.items() if not k.endswith("_API_KEY")}
    return subprocess.run(
        [*_command(), "quota", "show", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, "DATABASE_URL": dsn},
        timeout=TIMEOUT,
    )


@pytest.fixture
async def governed(pg_dsn: str, pg: asyncpg.Connection) -> tuple[uuid.UUID, float]:
    """A tenant with a budget, an rpm limit and per-user limits, after 3 requests of alice."""
    await pg.execute(
        "INSERT INTO model_prices (provider, model, input_per_m, output_per_m, effective_from)"
        " VALUES ('llm7', $1, 1000, 1000, '2000-01-01') ON CONFLICT DO NOTHING",
        PRICEY,
    )
    t = await make_tenant(
        pg,
        inference_config={
            "preferred_provider": "llm7",
            "preferred_models": {"llm7": PRICEY},
            "budget": {"max_usd": 5, "period": "1mo"},
            "limits": {"requests_per_minute": 100},
            "user_limits": {"requests_per_minute": 10},
        },
    )
    async with SimulatedProvider(name="l") as sim:
        settings = {"llm7": provider_settings("llm7", sim.base_url, api_key="sys-l")}
        async with TenantLLMRouter(pg_dsn, providers=settings) as router:
            for _ in range(3):
                await router.complete_for_tenant(t, MSG, max_tokens=20, user_id="alice")
    spent = await pg.fetchval(
        "SELECT sum(estimated_cost_usd) FROM model_usage_stats WHERE tenant_id = $1", t
    )
    return t, float(spent)


async def test_quota_show_json_lists_each_limit(
    pg_dsn: str, governed: tuple[uuid.UUID, float]
) -> None:
    t, spent = governed
    proc = await asyncio.to_thread(quota, pg_dsn, str(t), "--user", "alice", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    found = {(r["scope"], r["limit"]): r for r in rows}
    assert set(found) == {
        ("tenant", "max_usd"),
        ("tenant", "requests_per_minute"),
        ("user", "requests_per_minute"),
    }
    for row in rows:
        assert list(row)[:7] == COLUMNS
        assert row["remaining"] == pytest.approx(row["allowed"] - row["used"] - row["reserved"])
    budget = found["tenant", "max_usd"]
    assert budget["allowed"] == 5 and budget["used"] == pytest.approx(spent, rel=1e-6)
    assert budget["resets_at"].endswith("+00:00") and budget["resets_at"][8:10] == "01"
    assert found["tenant", "requests_per_minute"]["used"] == 3
    user = found["user", "requests_per_minute"]
    assert (user["used"], user["allowed"], user["user_id"]) == (3, 10, "alice")


async def test_quota_show_table_has_one_row_per_limit(
    pg_dsn: str, governed: tuple[uuid.UUID, float]
) -> None:
    t, _ = governed
    proc = await asyncio.to_thread(quota, pg_dsn, str(t))
    assert proc.returncode == 0, proc.stderr
    header, *lines = proc.stdout.splitlines()
    assert header.split() == COLUMNS
    assert sorted(line.split()[:2] for line in lines) == [
        ["tenant", "max_usd"],
        ["tenant", "requests_per_minute"],
    ]
    [rpm] = [line.split() for line in lines if "requests_per_minute" in line]
    assert rpm[2:4] == ["100", "3"]  # allowed, used


async def test_quota_show_tenant_without_limits(pg_dsn: str, pg: asyncpg.Connection) -> None:
    t = await make_tenant(pg)
    proc = await asyncio.to_thread(quota, pg_dsn, str(t), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    proc = await asyncio.to_thread(quota, pg_dsn, str(t))
    assert proc.returncode == 0 and "no budgets or limits" in proc.stdout


@pytest.mark.parametrize("tenant", [str(uuid.uuid4()), "not-a-uuid"])
async def test_quota_show_unknown_tenant_is_one_line_exit_1(pg_dsn: str, tenant: str) -> None:
    proc = await asyncio.to_thread(quota, pg_dsn, tenant)
    assert_one_line_error(proc, 1)
    assert "unknown tenant" in proc.stderr
    assert proc.stdout == ""


def test_quota_show_bad_format_is_a_usage_error() -> None:
    proc = quota("postgresql://postgres@127.0.0.1:1/x", str(uuid.uuid4()), "--format", "xml")
    assert_one_line_error(proc, 2)


def test_quota_show_unreachable_database_is_one_line_exit_1() -> None:
    proc = quota("postgresql://postgres:s3cret@127.0.0.1:1/x", str(uuid.uuid4()))
    assert_one_line_error(proc, 1)
    assert "s3cret" not in proc.stderr


async def test_quota_show_lists_a_virtual_keys_limits(pg_dsn: str, pg: asyncpg.Connection) -> None:
    from llm_gateway.server.virtual_keys import VirtualKeyStore

    t = await make_tenant(pg)  # no limits of its own
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        store = VirtualKeyStore(pool, notify=False)
        await store.start()
        _, key = await store.create(t, limits={"requests_per_minute": 7})
    finally:
        await pool.close()
    proc = await asyncio.to_thread(quota, pg_dsn, str(t), "--key", str(key.id), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(proc.stdout)
    assert (row["scope"], row["limit"], row["allowed"], row["used"]) == (
        "key",
        "requests_per_minute",
        7,
        0,
    )
    assert row["key_id"] == str(key.id)
    # A key of no tenant's, or of another tenant's: one line naming it, exit 1.
    other = await make_tenant(pg)
    proc = await asyncio.to_thread(quota, pg_dsn, str(other), "--key", str(key.id))
    assert_one_line_error(proc, 1)
    assert f"has no virtual key {key.id}" in proc.stderr
