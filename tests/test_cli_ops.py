"""The operator commands: ``tenants list|show|explain``, ``health`` and ``db status``.

Real PostgreSQL (the session database, plus an empty one for pending migrations) and real
simulator processes (``llm-gateway simulate``) over loopback HTTP; a closed port plays a
provider that is down. The commands run in-process through ``llm_gateway.cli.main`` (output
captured), and as a process where the exit code of a failure is the point.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from llm_gateway.cli import main
from llm_gateway.keys import Fingerprinter
from llm_gateway.migrate import apply_migrations
from llm_gateway.secrets import KeyRing, generate_entry
from llm_gateway.tenant_keys import set_tenant_keys
from tests.conftest import make_tenant
from tests.test_cli import ENV, ROOT, _command, assert_one_line_error, empty_dsn, run

FP_SECRET = "ops-cli-fingerprint-secret"
TENANT_KEY = "sk-tenant-known-secret-7f3a"
SYSTEM_KEY = "gsk-system-known-secret-91c2"
_PROVIDER_VARS = ("GROQ", "OPENROUTER", "LLM7", "OPENAI", "LOCAL_LLM")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed when the block ends: nothing listens there


CLOSED = f"http://127.0.0.1:{_closed_port()}"
__all__ = ["empty_dsn"]  # a fixture of test_cli, used here


@pytest.fixture
def env(pg_dsn: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No provider key in the environment, every provider at a closed port, the test DB."""
    for name in _PROVIDER_VARS:
        monkeypatch.delenv(f"{name}_API_KEY", raising=False)
        monkeypatch.setenv(f"{name}_BASE_URL", f"{CLOSED}/v1")
    monkeypatch.delenv("LOCAL_LLM_BASE_URL")  # local is configured only by its URL
    monkeypatch.delenv("LLM_GATEWAY_KEYRING", raising=False)
    monkeypatch.setenv("LLM_GATEWAY_FINGERPRINT_KEY", FP_SECRET)
    monkeypatch.setenv("DATABASE_URL", pg_dsn)
    monkeypatch.setenv("LLM_GATEWAY_SPOOL_DIR", str(tmp_path / "spool"))


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def tenant(pg_dsn: str, **kwargs: Any) -> uuid.UUID:
    async def create() -> uuid.UUID:
        conn = await asyncpg.connect(pg_dsn)
        try:
            return await make_tenant(conn, **kwargs)
        finally:
            await conn.close()

    return asyncio.run(create())


@pytest.fixture(scope="module")
def simulators() -> Iterator[dict[str, str]]:
    """Two simulator processes: one that answers, one whose completions fail with 503."""
    procs = {
        "ok": subprocess.Popen(
            [*_command(), "simulate", "--port", "0"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE
        ),
        "503": subprocess.Popen(
            [*_command(), "simulate", "--port", "0", "--fail-with", "503"],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
        ),
    }
    try:
        urls = {}
        for name, proc in procs.items():
            assert proc.stdout is not None
            urls[name] = proc.stdout.readline().decode().strip()
            assert urls[name].startswith("http://127.0.0.1:"), name
        yield urls
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=60)


# --- tenants ---------------------------------------------------------------------------------


def test_tenants_list_json_and_table(
    env: None, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tenant(
        pg_dsn,
        name="acme",
        llm_tokens={"groq": TENANT_KEY, "OpenAI": "sk-other", "llm7": None},
        inference_config={"preferred_provider": "Groq", "budget": {"max_usd": 5}},
    )
    bad = tenant(pg_dsn, name="broken", inference_config={"preferred_models": {"nope": "m"}})
    sealed = tenant(pg_dsn, name="sealed")
    ring = KeyRing.parse(generate_entry())

    async def seal() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await set_tenant_keys(conn, ring, sealed, {"groq": TENANT_KEY})
        finally:
            await conn.close()

    asyncio.run(seal())  # encrypted under a ring this command does not have
    code, out, err = cli(capsys, "tenants", "list", "--format", "json")
    assert code == 0, err
    rows = {t["id"]: t for t in json.loads(out)["tenants"]}
    assert rows[str(good)] == {
        "id": str(good),
        "name": "acme",
        "providers": ["groq", "openai"],
        "preferred_provider": "groq",
        "governance": ["budget"],
        "config_error": None,
        "updated_at": rows[str(good)]["updated_at"],
    }
    assert rows[str(bad)]["config_error"].startswith("inference_config.preferred_models.nope")
    assert rows[str(bad)]["governance"] == [] and rows[str(bad)]["providers"] == []
    assert rows[str(sealed)]["providers"] == ["groq"]
    assert rows[str(sealed)]["config_error"] is None  # listed, not decrypted
    assert TENANT_KEY not in out + err

    code, out, err = cli(capsys, "tenants", "list")
    assert code == 0, err
    line = next(line for line in out.splitlines() if str(good) in line)
    assert "groq,openai" in line and "budget" in line and " ok " in line
    assert "invalid: inference_config.preferred_models.nope" in out
    assert TENANT_KEY not in out + err


def test_tenants_show_is_the_validated_config_with_fingerprints_only(
    env: None,
    pg_dsn: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GROQ_API_KEY", SYSTEM_KEY)
    tid = tenant(
        pg_dsn,
        name="shown",
        llm_tokens={"openai": TENANT_KEY},
        inference_config={"preferred_models": {"Groq": "llama-3.1-8b-instant"}},
    )
    fingerprint = Fingerprinter(FP_SECRET)
    code, out, err = cli(capsys, "tenants", "show", str(tid), "--format", "json")
    assert code == 0, err
    view = json.loads(out)
    assert view["tenant_id"] == str(tid) and view["name"] == "shown" and view["found"] is True
    assert view["keys"] == {"openai": fingerprint(TENANT_KEY)}
    providers = view["providers"]
    assert providers["openai"]["key_source"] == "tenant"
    assert providers["openai"]["key_fingerprint"] == fingerprint(TENANT_KEY)
    assert providers["groq"]["key_source"] == "system"
    assert providers["groq"]["key_fingerprint"] == fingerprint(SYSTEM_KEY)
    assert providers["openrouter"] == {
        "base_url": f"{CLOSED}/v1",
        "key_source": None,
        "key_fingerprint": None,
        "excluded": "no tenant key and no system key",
    }
    inference = view["inference_config"]
    assert inference["preferred_models"] == {"groq": "llama-3.1-8b-instant"}  # normalised
    assert inference["auto_failover"] is True and inference["use_system_keys"] is True
    assert inference["budget"] is None
    assert TENANT_KEY not in out + err and SYSTEM_KEY not in out + err

    code, out, err = cli(capsys, "tenants", "show", str(tid))
    assert code == 0, err
    assert fingerprint(TENANT_KEY) in out and "llama-3.1-8b-instant" in out
    assert TENANT_KEY not in out + err and SYSTEM_KEY not in out + err


def test_tenants_explain_chain_scores_and_exclusions(
    env: None,
    pg_dsn: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GROQ_API_KEY", SYSTEM_KEY)
    tid = tenant(
        pg_dsn,
        llm_tokens={"llm7": TENANT_KEY},
        inference_config={"preferred_provider": "llm7"},
    )
    code, out, err = cli(capsys, "tenants", "explain", str(tid), "--format", "json")
    assert code == 0, err
    explained = json.loads(out)
    chain = explained["chain"]
    assert [c["provider"] for c in chain] == ["llm7", "groq"]  # preferred first
    assert chain[0]["key_source"] == "tenant"
    assert chain[0]["key_fingerprint"] == Fingerprinter(FP_SECRET)(TENANT_KEY)
    assert all(isinstance(c["score"], float) for c in chain)
    assert explained["excluded"]["openai"] == "no tenant key and no system key"

    code, out, err = cli(capsys, "tenants", "explain", str(tid))
    assert code == 0, err
    assert "llm7" in out and "excluded" in out and "no tenant key and no system key" in out
    assert TENANT_KEY not in out + err and SYSTEM_KEY not in out + err


@pytest.mark.parametrize("command", ["show", "explain"])
def test_tenants_unknown_tenant_is_exit_1(pg_dsn: str, command: str) -> None:
    missing = "00000000-0000-0000-0000-0000000000ff"
    proc = run("tenants", command, missing, "--dsn", pg_dsn)
    assert_one_line_error(proc, 1)
    assert f"unknown tenant {missing}" in proc.stderr


def test_tenants_explain_bad_tokens_is_a_usage_error() -> None:
    proc = run("tenants", "explain", str(uuid.uuid4()), "--tokens", "-1")
    assert_one_line_error(proc, 2)
    assert "argument --tokens: -1 is not >= 0" in proc.stderr


# --- health ----------------------------------------------------------------------------------


def test_health_all_up_exits_0(
    env: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    simulators: dict[str, str],
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", simulators["ok"])
    monkeypatch.setenv("OPENAI_API_KEY", SYSTEM_KEY)
    monkeypatch.setenv("LOCAL_LLM_BASE_URL", simulators["ok"])  # a keyless local server
    # Without --tenant the database is not needed: an unreachable one changes nothing.
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/postgres")
    code, out, err = cli(capsys, "health", "--format", "json")
    assert code == 0, (out, err)
    report = json.loads(out)
    assert report["ok"] is True
    rows = {r["provider"]: r for r in report["providers"]}
    assert rows["openai"]["status"] == "up" and rows["openai"]["probe"] == "models"
    assert rows["openai"]["key_source"] == "system" and rows["openai"]["error"] is None
    assert rows["openai"]["latency_ms"] >= 0
    assert rows["local"]["status"] == "up" and rows["local"]["key_source"] == "none"
    assert rows["groq"]["status"] == "skipped" and rows["groq"]["error"] == "no key configured"
    assert SYSTEM_KEY not in out + err


def test_health_one_down_exits_3_and_tenant_keys_are_probed(
    env: None,
    pg_dsn: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    simulators: dict[str, str],
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", simulators["ok"])
    monkeypatch.setenv("OPENAI_API_KEY", SYSTEM_KEY)
    monkeypatch.setenv("GROQ_API_KEY", "gsk-down")  # groq stays at the closed port
    monkeypatch.setenv("LLM7_BASE_URL", simulators["ok"])
    tid = tenant(pg_dsn, llm_tokens={"llm7": TENANT_KEY})
    code, out, err = cli(capsys, "health", "--tenant", str(tid), "--format", "json")
    assert code == 3, (out, err)
    report = json.loads(out)
    assert report["ok"] is False
    rows = {(r["provider"], r["key_source"]): r for r in report["providers"]}
    assert rows[("openai", "system")]["status"] == "up"
    assert rows[("llm7", "tenant")]["status"] == "up"
    down = rows[("groq", "system")]
    assert down["status"] == "down" and down["error"].startswith("connection error")
    assert TENANT_KEY not in out + err and SYSTEM_KEY not in out + err

    code, out, err = cli(capsys, "health", "--tenant", str(tid))
    assert code == 3
    line = next(line for line in out.splitlines() if "groq" in line)
    assert "down" in line and "connection error" in line
    assert TENANT_KEY not in out + err


def test_health_completion_probe_sees_failing_completions(
    env: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    simulators: dict[str, str],
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", simulators["ok"])
    monkeypatch.setenv("OPENAI_API_KEY", SYSTEM_KEY)
    monkeypatch.setenv("LLM7_BASE_URL", simulators["503"])
    monkeypatch.setenv("LLM7_API_KEY", SYSTEM_KEY)
    code, out, err = cli(capsys, "health", "--probe", "completion", "--format", "json")
    assert code == 3, (out, err)
    rows = {r["provider"]: r for r in json.loads(out)["providers"]}
    assert rows["openai"]["status"] == "up" and rows["openai"]["probe"] == "completion"
    assert rows["llm7"]["status"] == "down" and "ServerError" in rows["llm7"]["error"]
    assert SYSTEM_KEY not in out + err


@pytest.fixture
def no_models_endpoint(simulators: dict[str, str]) -> Iterator[str]:
    """A server without ``GET /models`` (404) whose completions are the simulator's: a
    forwarding front of the real simulator process, as some self-hosted servers are."""
    upstream = simulators["ok"]

    class Front(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            answer = httpx.post(
                upstream + self.path.removeprefix("/v1"),
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=30,
            )
            self.send_response(answer.status_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Front)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_health_falls_back_to_a_completion_where_models_is_not_served(
    env: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_models_endpoint: str,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", no_models_endpoint)
    monkeypatch.setenv("OPENAI_API_KEY", SYSTEM_KEY)
    code, out, err = cli(capsys, "health", "--format", "json")
    assert code == 0, (out, err)
    rows = {r["provider"]: r for r in json.loads(out)["providers"]}
    assert rows["openai"]["status"] == "up" and rows["openai"]["probe"] == "completion"
    code, out, err = cli(capsys, "health", "--probe", "models", "--format", "json")
    assert code == 3
    rows = {r["provider"]: r for r in json.loads(out)["providers"]}
    assert rows["openai"]["error"] == "HTTP 404 Not Found"


def test_health_without_any_key_exits_3(env: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "health", "--format", "json")
    assert code == 3
    assert json.loads(out)["ok"] is False
    assert "no provider has a key to probe" in err


# --- db status -------------------------------------------------------------------------------


def test_db_status_of_a_migrated_database(
    env: None, pg_dsn: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    async def maintain() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("SELECT llm_gateway_maintain_usage()")
        finally:
            await conn.close()

    asyncio.run(maintain())
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    # Names as the usage writer makes them: the row count is in the name.
    (spool / f"usage-{1_700_000_000 * 10**9:020d}-42-000000-n5.jsonl").write_text("")
    (spool / f"usage-{1_700_000_100 * 10**9:020d}-42-000001-n3.jsonl").write_text("")
    code, out, err = cli(capsys, "db", "status", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] is True and report["pending"] == []
    assert {m["state"] for m in report["migrations"]} == {"applied"}
    assert [m["version"] for m in report["migrations"]][:2] == [1, 2]
    names = [p["name"] for p in report["partitions"]]
    assert "model_usage_stats_default" in names and len(names) >= 5
    assert report["partitions"][-1]["is_default"] is True
    assert report["rollup"]["last_refresh"] is not None
    assert report["rollup"]["lag_seconds"] >= 0
    assert report["spool"]["pending_files"] == 2 and report["spool"]["pending_rows"] == 8
    assert report["spool"]["oldest"].startswith("2023-11-14T22:13:20")

    code, out, err = cli(capsys, "db", "status")
    assert code == 0, err
    assert "model_usage_stats_default" in out and "spool pending rows" in out


def test_db_status_pending_migrations_exit_3(
    env: None, capsys: pytest.CaptureFixture[str], empty_dsn: str
) -> None:
    code, out, _ = cli(capsys, "db", "status", "--dsn", empty_dsn, "--format", "json")
    assert code == 3
    report = json.loads(out)
    assert report["ok"] is False and report["pending"][:3] == [1, 2, 3]
    assert report["partitions"] == [] and report["rollup"] is None
    assert report["spool"]["exists"] is False  # and not created by looking
    code, out, _ = cli(capsys, "db", "status", "--dsn", empty_dsn)
    assert code == 3 and "pending migrations: [1, 2" in out


def test_db_status_reports_changed_and_unknown_migrations(
    env: None, capsys: pytest.CaptureFixture[str], empty_dsn: str
) -> None:
    async def arrange() -> None:
        await apply_migrations(empty_dsn)
        conn = await asyncpg.connect(empty_dsn)
        try:
            await conn.execute(
                "UPDATE llm_gateway_migrations SET checksum = 'edited' WHERE version = 3"
            )
            await conn.execute(
                "INSERT INTO llm_gateway_migrations (version, name, checksum)"
                " VALUES (999, 'from_the_future', 'x')"
            )
        finally:
            await conn.close()

    asyncio.run(arrange())
    code, out, err = cli(capsys, "db", "status", "--dsn", empty_dsn, "--format", "json")
    assert code == 0, err  # nothing pending: a changed or newer migration is reported only
    states = {m["version"]: m["state"] for m in json.loads(out)["migrations"]}
    assert states[3] == "changed" and states[999] == "unknown" and states[1] == "applied"
    assert json.loads(out)["migrations"][-1]["name"] == "from_the_future"


def test_db_status_unreachable_database_is_one_line_exit_1() -> None:
    proc = run("db", "status", "--dsn", "postgresql://postgres@127.0.0.1:1/postgres")
    assert_one_line_error(proc, 1)
    assert "no PostgreSQL reachable" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [["tenants", "list"], ["tenants", "show", "x"], ["tenants", "explain", "x"], ["health"],
     ["db", "status"]],
    ids=" ".join,
)  # fmt: skip
def test_format_is_table_or_json(args: list[str]) -> None:
    proc = run(*args, "--format", "yaml")
    assert_one_line_error(proc, 2)
    assert "argument --format: invalid choice: 'yaml'" in proc.stderr
