"""The ``llm-gateway`` command (and ``python -m llm_gateway.simulator``), run as real processes.

Exit codes: 0 ok, 1 runtime error (one ``llm-gateway: ...`` line on stderr), 2 usage error
(argparse). No test may see a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from llm_gateway import cli
from llm_gateway.router import DEFAULT_DSN
from llm_gateway.simulator import run_simulator
from tests.conftest import ADMIN_DSN, scratch_database

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "llm-gateway"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}
TIMEOUT = 120  # seconds; generous, the machine is loaded (a hang must still end the test)


def _command() -> list[str]:
    """The installed console script, or the module where the package is not installed."""
    return [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "llm_gateway.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_command(), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env or ENV,
        timeout=TIMEOUT,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> None:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    if code == 1:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("llm-gateway: "), proc.stderr


def flat(text: str) -> str:
    """Help text with argparse's line wrapping undone."""
    return " ".join(text.split())


# --- version and help ----------------------------------------------------------------------------


def test_version_comes_from_package_metadata() -> None:
    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"llm-gateway {importlib.metadata.version('llm-gateway')}\n"


@pytest.mark.parametrize(
    "args", [[], ["db"], ["db", "migrate"], ["simulate"], ["demo"]], ids=" ".join
)
def test_help_is_plain_text(args: list[str]) -> None:
    proc = run(*args, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: llm-gateway")
    for markup in ("``", ":data:", ":func:", ":class:", ":mod:"):
        assert markup not in proc.stdout


def test_db_migrate_help_states_the_real_default() -> None:
    text = flat(run("db", "migrate", "--help").stdout)
    assert "DATABASE_URL" in text
    assert DEFAULT_DSN in text  # the fallback when DATABASE_URL is unset, as the code does it


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _subparsers(sub)


def test_every_option_has_help() -> None:
    missing = [
        f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        for parser in _subparsers(cli._parser())
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert missing == []


def test_help_and_version_do_not_import_the_sdks() -> None:
    code = """
import sys
from llm_gateway.cli import main
for args in (["--help"], ["--version"], ["simulate", "--help"], ["db", "migrate", "--help"]):
    try:
        main(args)
    except SystemExit:
        pass
print("LOADED", sorted(m for m in ("openai", "groq") if m in sys.modules), file=sys.stderr)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stderr


def test_import_llm_gateway_is_lazy_but_complete() -> None:
    code = """
import sys
import llm_gateway
from llm_gateway import GatewayError, SimulatedProvider
print(sorted(m for m in ("openai", "groq") if m in sys.modules))
missing = [name for name in llm_gateway.__all__ if getattr(llm_gateway, name, None) is None]
print(missing, "openai" in sys.modules, set(llm_gateway.__all__) <= set(dir(llm_gateway)))
print(llm_gateway.__version__)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "[]",
        "[] True True",
        importlib.metadata.version("llm-gateway"),
    ]


def test_unknown_attribute_is_an_attribute_error() -> None:
    import llm_gateway

    with pytest.raises(AttributeError, match="no_such_name"):
        _ = llm_gateway.no_such_name


def test_missing_command_is_a_usage_error() -> None:
    assert_one_line_error(run(), 2)
    assert_one_line_error(run("db"), 2)


# --- simulate ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--fail-with", "teapot"],
        ["--fail-rate", "2"],
        ["--fail-rate", "-0.1"],
        ["--fail-rate", "nan"],
        ["--port", "70000"],
        ["--port", "-1"],
        ["--port", "http"],
        ["--latency-ms", "-5"],
        ["--latency-ms", "inf"],
        ["--retry-after", "-1"],
        ["--flavor", "anthropic"],
    ],
    ids=" ".join,
)
def test_simulate_rejects_bad_values_with_a_usage_error(args: list[str]) -> None:
    # --port 0 (any free port) so that a value wrongly accepted starts a server, which the
    # timeout then turns into a failure instead of a hang.
    proc = run("simulate", "--port", "0", *args)
    assert_one_line_error(proc, 2)
    assert proc.stderr.strip().splitlines()[-1].startswith("llm-gateway simulate: error: ")
    assert args[0] in proc.stderr


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 70000},
        {"port": -1},
        {"latency_ms": -1.0},
        {"latency_ms": float("nan")},
        {"retry_after": -1.0},
        {"fail_rate": 2.0},
        {"fail_with": "teapot"},
    ],
    ids=str,
)
def test_run_simulator_rejects_out_of_range_arguments_before_listening(
    kwargs: dict[str, Any],
) -> None:
    options = {"port": 0, **kwargs}
    with pytest.raises(ValueError):
        run_simulator(**options)


def test_simulate_on_a_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run("simulate", "--port", str(port))
    assert_one_line_error(proc, 1)
    assert f"127.0.0.1:{port}" in proc.stderr


@pytest.mark.parametrize(
    "entry",
    [[], ["-m", "llm_gateway.simulator"]],
    ids=["llm-gateway simulate", "python -m llm_gateway.simulator"],
)
def test_simulate_serves_the_chosen_behaviour_until_sigterm(entry: list[str]) -> None:
    command = [sys.executable, *entry] if entry else [*_command(), "simulate"]
    args = ["--port", "0", "--fail-with", "503", "--name", "s1", "--model", "m-1"]
    with subprocess.Popen(
        [*command, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            base_url = proc.stdout.readline().decode().strip()
            assert base_url.startswith("http://127.0.0.1:"), proc.stderr.read()
            body = {"model": "m-1", "messages": [{"role": "user", "content": "hi"}]}
            response = httpx.post(f"{base_url}/chat/completions", json=body, timeout=30)
            assert response.status_code == 503
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=TIMEOUT) == 0
            assert proc.stderr.read() == b""
        finally:
            if proc.poll() is None:
                proc.kill()


def test_python_m_simulator_is_the_same_cli() -> None:
    module = [sys.executable, "-m", "llm_gateway.simulator"]
    own = subprocess.run(
        [*module, "--help"], capture_output=True, text=True, env=ENV, timeout=TIMEOUT
    )
    assert own.returncode == 0, own.stderr
    assert own.stdout == run("simulate", "--help").stdout
    bad = subprocess.run(
        [*module, "--fail-rate", "2"], capture_output=True, text=True, env=ENV, timeout=TIMEOUT
    )
    assert_one_line_error(bad, 2)


# --- db migrate ----------------------------------------------------------------------------------


@pytest.fixture
def empty_dsn() -> Iterator[str]:
    """A new, empty database (no migrations applied), dropped afterwards."""
    with scratch_database("cli", migrated=False) as dsn:
        yield dsn


async def _tables(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {r["tablename"] for r in rows}


def test_db_migrate_creates_the_schema_then_reports_up_to_date(empty_dsn: str) -> None:
    first = run("db", "migrate", "--dsn", empty_dsn)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("applied migrations: [1, ")
    assert {"tenants", "model_usage_stats", "llm_gateway_migrations"} <= asyncio.run(
        _tables(empty_dsn)
    )
    # The second run finds the DSN through DATABASE_URL, as the help says.
    again = run("db", "migrate", env={**ENV, "DATABASE_URL": empty_dsn})
    assert again.returncode == 0, again.stderr
    assert again.stdout == "schema is up to date\n"


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://postgres@127.0.0.1:1/postgres",  # nothing listens on port 1
        ADMIN_DSN.rpartition("/")[0] + "/llmgw_no_such_database",
    ],
    ids=["unreachable", "no such database"],
)
def test_db_migrate_failure_is_one_line_and_exit_1(dsn: str) -> None:
    assert_one_line_error(run("db", "migrate", "--dsn", dsn), 1)


# --- demo ----------------------------------------------------------------------------------------


def test_demo_help() -> None:
    proc = run("demo", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--dsn" in proc.stdout and "DATABASE_URL" in proc.stdout


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_demo_into_a_closed_pipe_exits_1_without_traceback(
    empty_dsn: str, unbuffered: bool
) -> None:
    """``llm-gateway demo | head -2`` made deterministic: the reader is gone before any write.

    Buffered, the error surfaces when stdout is flushed at the end; unbuffered, at the first
    ``print`` inside the running demo.
    """
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**ENV, "PYTHONUNBUFFERED": "1"} if unbuffered else ENV
    try:
        proc = subprocess.run(
            [*_command(), "demo", "--dsn", empty_dsn],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=TIMEOUT,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1
    assert proc.stderr == ""


def test_demo_piped_into_head(empty_dsn: str) -> None:
    """The real pipeline; with unbuffered output the pipe usually breaks mid-demo."""
    command = " ".join([*_command(), "demo", "--dsn", empty_dsn])
    proc = subprocess.run(
        ["sh", "-c", f"{command} | head -2"],
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONUNBUFFERED": "1"},
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0
    assert len(proc.stdout.splitlines()) == 2
    assert proc.stderr == ""
