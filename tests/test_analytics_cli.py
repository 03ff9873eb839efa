"""``llm-gateway usage report|anomalies|recommend`` against the test database."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from llm_gateway.cli import main
from tests.conftest import scratch_database

TENANT = uuid.uuid4()

INSERT = """
INSERT INTO model_usage_stats (id, tenant_id, user_id, provider, model_name, endpoint,
    input_tokens, output_tokens, latency_ms, estimated_cost_usd, status, "timestamp", tags)
SELECT gen_random_uuid(), $1, 'u' || (g % 2), 'openai',
       CASE WHEN g % 2 = 0 THEN 'gpt-4o' ELSE 'gpt-4o-mini' END, '/chat', 1000, 100, 100 + g,
       CASE WHEN g % 2 = 0 THEN 0.0035 ELSE 0.00021 END,
       CASE WHEN g % 10 = 0 THEN 'error' ELSE 'success' END,
       $2::timestamptz - g * interval '1 minute', ARRAY['t' || (g % 3)]
FROM generate_series(1, 60) AS g
"""


@pytest.fixture(scope="module")
def db() -> Iterator[str]:
    """A database of its own: recommendations weigh every tenant's success rates, so rows of
    other modules (or these, for them) would change the answers."""

    async def arrange(dsn: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            now = datetime.now(UTC) - timedelta(minutes=1)
            await conn.execute(INSERT, TENANT, now)
            await conn.execute(
                "SELECT llm_gateway_refresh_usage_hourly($1, $2)", now - timedelta(hours=2), now
            )
        finally:
            await conn.close()

    with scratch_database("usage_cli") as dsn:
        asyncio.run(arrange(dsn))
        yield dsn


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_report_json_by_model(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "usage", "report", "--dsn", db, "--tenant", str(TENANT), "--by", "model",
        "--format", "json",
    )  # fmt: skip
    assert code == 0
    rows = {r["model"]: r for r in json.loads(out)}
    assert rows["openai/gpt-4o"]["requests"] == 30 and rows["openai/gpt-4o"]["errors"] == 6
    assert rows["openai/gpt-4o"]["cost_usd"] == "0.105000"
    assert rows["openai/gpt-4o-mini"]["errors"] == 0


@pytest.mark.parametrize("by", ["day", "provider", "user", "endpoint", "tag"])
def test_report_csv_totals_agree_for_every_grouping(
    db: str, capsys: pytest.CaptureFixture[str], by: str
) -> None:
    code, out, _ = run(
        capsys, "usage", "report", "--dsn", db, "--tenant", str(TENANT), "--by", by,
        "--format", "csv", "--since", "2d",
    )  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows and set(rows[0]) == {by, "requests", "input_tokens", "output_tokens",
                                     "cost_usd", "errors"}  # fmt: skip
    # Each row has one tag, so every grouping adds up to the 60 attempts.
    assert sum(int(r["requests"]) for r in rows) == 60


def test_report_for_one_user_and_table_output(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "usage", "report", "--dsn", db, "--tenant", str(TENANT), "--user", "u0",
        "--by", "model",
    )  # fmt: skip
    assert code == 0
    assert "openai/gpt-4o " in out and "gpt-4o-mini" not in out  # u0 only used gpt-4o
    assert "30" in out and "Usage by model" in out


def test_usage_errors_exit_2(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "usage", "report", "--dsn", db, "--user", "u0")
    assert code == 2 and "--user needs --tenant" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["usage", "report", "--since", "yesterday"])
    assert exit_info.value.code == 2
    assert "30d, 12h, 2w or YYYY-MM-DD" in capsys.readouterr().err


def test_anomalies_and_recommend(
    db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run(capsys, "usage", "anomalies", "--dsn", db, "--format", "json")
    assert code == 0 and isinstance(json.loads(out), list)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-system-key-for-test")  # a system key reaches openai
    code, out, _ = run(
        capsys, "usage", "recommend", "--dsn", db, "--tenant", str(TENANT), "--format", "json"
    )
    assert code == 0
    body = json.loads(out)
    assert {u["model"] for u in body["in_use"]} == {"gpt-4o", "gpt-4o-mini"}
    assert [(r["current"], r["switch_to"]) for r in body["recommendations"]] == [
        ("openai/gpt-4o", "openai/gpt-4o-mini")
    ]
    assert "sk-system-key-for-test" not in out
