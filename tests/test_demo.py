"""``llm-gateway demo``: end to end against the test server, its one-line failures, and the
embedded PostgreSQL in a network namespace where no server is reachable.

The namespace tests run the real demo (pgserver initdb included, ~10 s each) in a subprocess,
with wide timeouts; they skip with the reason where a network namespace cannot be made.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from llm_gateway.cli import main
from llm_gateway.embedded import in_container, install_hint, plan_embedded
from llm_gateway.errors import DatabaseError
from usage.pricing import default_price_book

from .conftest import ADMIN_DSN

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds; initdb and a first start on a loaded machine


def _with_password(dsn: str, password: str) -> str:
    """The admin DSN with a password added (the test server trusts loopback, so it is ignored)."""
    scheme, rest = dsn.split("://", 1)
    userinfo, _, hostpart = rest.rpartition("@")
    user = userinfo.split(":", 1)[0] or "postgres"
    return f"{scheme}://{user}:{password}@{hostpart}"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.pop("LLM_GATEWAY_DEMO_DATABASE", None)
    env.update(extra)
    return env


async def _drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# --- end to end against the test server ----------------------------------------------------


def _tables(output: str, first_column: str = "provider") -> list[list[str]]:
    """The lines below each header starting with ``first_column`` (data rows, a rule, the
    total row): ``provider`` the per-attempt usage tables, ``provider/model`` the monthly ones."""
    tables: list[list[str]] = []
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.split()[:1] == [first_column] and "cost_usd" in line:
            body = lines[i + 2 :]
            tables.append(body[: next(j for j, x in enumerate(body) if not x.strip())])
    return tables


@pytest.fixture(scope="module")
def demo_run() -> Iterator[tuple[str, str]]:
    """The demo run once against the test server: (its database, its output)."""
    name = f"llmgw_demo_test_{uuid.uuid4().hex[:8]}"
    dsn = _with_password(ADMIN_DSN, "s3cret-demo-pw")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "llm_gateway.cli", "demo", "--dsn", dsn],
            env=_env(LLM_GATEWAY_DEMO_DATABASE=name),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=REPO,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        yield name, out
    finally:
        asyncio.run(_drop_database(name))


def test_demo_end_to_end_reports_reasons_units_and_totals(demo_run: tuple[str, str]) -> None:
    demo_database, out = demo_run
    assert "s3cret-demo-pw" not in out and ":***@" in out
    assert f"database {demo_database}, created" in out
    # Why each request was served as it was.
    assert re.search(r"failover: openrouter failed \(HTTP 503\b.*failed over to groq", out), out
    assert "fallback: Globex has no llm7 key of its own" in out
    # Labelled tokens, units.
    assert "tokens in=7 out=10" in out and "avg_latency_ms" in out and "latency=" in out
    assert re.search(r"latency=\d+\.\d ms", out)
    # Failed attempts show 0 tokens and 0 cost, not blanks; totals are the sums of the rows.
    request_costs: dict[str, Decimal] = {"Acme": Decimal(0), "Globex": Decimal(0)}
    for tenant, cost in re.findall(r"^    (Acme|Globex) .* cost=\$(\d+\.\d+)", out, re.M):
        request_costs[tenant] += Decimal(cost)
    tables = _tables(out)
    assert len(tables) == 2, out
    for tenant, table in zip(("Acme", "Globex"), tables, strict=True):
        rule = next(i for i, line in enumerate(table) if set(line.strip()) <= {"-", " "})
        rows, total = table[:rule], table[rule + 1]
        costs = [Decimal(re.findall(r"\d+\.\d{6}", row)[0]) for row in rows]
        assert total.strip().startswith("total")
        assert Decimal(re.findall(r"\d+\.\d{6}", total)[0]) == sum(costs) == request_costs[tenant]
        for row in rows:
            if " error " in row:
                assert re.search(r"error\s+tenant\s+3\s+0\s+0\s+0\.000000", row), row
    assert f"DROP DATABASE {demo_database};" in out


def _rows(table: list[str]) -> tuple[list[list[str]], list[str]]:
    """A table's data rows and its total row, split into cells."""
    rule = next(i for i, line in enumerate(table) if set(line.strip()) <= {"-", " "})
    return [line.split() for line in table[:rule]], table[rule + 1].split()


def test_demo_ends_with_the_month_by_model_and_a_recommendation_from_the_ledger(
    demo_run: tuple[str, str],
) -> None:
    _, out = demo_run
    # The monthly breakdown (from the rollups) agrees with the attempts read from the raw rows.
    attempts, months = _tables(out), _tables(out, "provider/model")
    assert len(attempts) == len(months) == 2, out
    monthly: dict[str, dict[str, list[str]]] = {}
    for tenant, raw, month in zip(("Acme", "Globex"), attempts, months, strict=True):
        expected: dict[str, list[Decimal]] = defaultdict(lambda: [Decimal(0)] * 5)
        for provider, model, status, _key, n, tin, tout, cost, _lat in _rows(raw)[0]:
            sums = expected[f"{provider}/{model}"]
            for i, v in enumerate((n, tin, tout, cost, n if status != "success" else 0)):
                sums[i] += Decimal(v)
        rows, total = _rows(month)
        got = {r[0]: [Decimal(v) for v in r[1:]] for r in rows}
        assert got == expected and len(got) >= 1
        assert [Decimal(v) for v in total[1:]] == [sum(c) for c in zip(*got.values(), strict=True)]
        monthly[tenant] = {r[0]: r for r in rows}
    assert {"groq/llama-3.3-70b-versatile", "openrouter/deepseek/deepseek-r1"} <= set(
        monthly["Acme"]
    )
    assert monthly["Acme"]["openrouter/deepseek/deepseek-r1"][5] == "3"  # its 503s: errors
    # One recommendation, its figures replayed from the monthly table and the price book.
    found = re.search(
        r"^    (Acme|Globex) (\S+): switch (\S+) -> (\S+?)/(\S+)\n"
        r"    its tokens \(in=(\d+) out=(\d+)\) cost \$([\d.]+) on \S+, would cost \$([\d.]+)"
        r" on \S+: \$([\d.]+) saved a month",
        out,
        re.M,
    )
    assert found, out
    tenant, endpoint, current, provider, model, tin, tout, cost, projected, saving = found.groups()
    assert endpoint == "/demo/chat" and current != f"{provider}/{model}"
    row = monthly[tenant][current]
    assert (tin, tout, cost) == (row[2], row[3], row[4])  # all its attempts succeeded
    price = default_price_book().lookup(provider, model)
    assert price is not None
    replay = (price.input_per_m * int(tin) + price.output_per_m * int(tout)) / 1_000_000
    assert Decimal(projected) == replay.quantize(Decimal("0.000001"))
    assert Decimal(saving) == (Decimal(cost) - replay).quantize(Decimal("0.01")) > 0


# --- every failure is one line naming its cause and what to check --------------------------


def _server() -> str:
    return ADMIN_DSN.split("@", 1)[1].rsplit("/", 1)[0]


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("not a url", "invalid DSN 'not a url'"),
        ("postgresql://u:s3cret@127.0.0.1:abc/db", "port 'abc'"),
        (f"postgresql://llmgw_no_role:s3cret@{_server()}/postgres", "authentication failed"),
        (f"postgresql://postgres:s3cret@{_server()}/llmgw_no_such_db", "does not exist"),
    ],
)
def test_demo_failure_is_one_line_naming_the_cause_and_dsn_flag(
    dsn: str, expected: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["demo", "--dsn", dsn]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # in particular, no embedded server was started
    err = captured.err
    assert err.count("\n") == 1 and expected in err and "--dsn" in err
    assert "s3cret" not in err and "DATABASE_URL" not in err


def test_unreachable_database_url_is_reported_not_replaced_by_an_embedded_server(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:s3cret@127.0.0.1:1/db")
    assert main(["demo"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no PostgreSQL reachable" in captured.err and "check DATABASE_URL" in captured.err
    assert "s3cret" not in captured.err


# --- the embedded server: one accurate line per situation ----------------------------------


def test_root_outside_a_container_is_refused_with_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError) as info:
        plan_embedded(euid=0, container=False, cache_home=tmp_path, temp=tmp_path, cause="x")
    message = str(info.value)
    assert "as a normal user" in message and "DATABASE_URL" in message
    assert "pip install" not in message  # installing the extra would not help as root


def test_root_in_a_container_keeps_everything_under_the_temp_folder(tmp_path: Path) -> None:
    temp = Path(tempfile.gettempdir())
    plan = plan_embedded(euid=0, container=True, cache_home=tmp_path, temp=temp, cause="x")
    assert plan.data.is_relative_to(temp) and plan.binaries is not None
    assert plan.binaries.is_relative_to(temp) and "pgserver" in plan.note


def test_a_normal_user_uses_the_cache_folder(tmp_path: Path) -> None:
    plan = plan_embedded(euid=1000, container=False, cache_home=tmp_path, temp=tmp_path, cause="x")
    assert plan.data == tmp_path / "llm-gateway" / "pgdata" and plan.binaries is None


def test_install_hint_installs_this_checkout_not_the_index_namesake() -> None:
    hint = install_hint()
    assert f"-e '{REPO}[embedded]'" in hint and "llm-gateway[embedded]" not in hint


# --- the embedded server for real, in a network namespace without PostgreSQL ---------------


def _modes(paths: list[Path]) -> dict[Path, int]:
    return {p: stat.S_IMODE(p.stat().st_mode) for p in paths if p.exists()}


def _guarded_paths() -> list[Path]:
    """Home, and every folder from the root down to pgserver's binaries."""
    import pgserver._commands as commands

    binaries = Path(commands.POSTGRES_BIN_PATH)
    return [Path.home(), binaries, *binaries.parents]


def _netns_prefix() -> list[str]:
    """Runs a shell command in a new network namespace with loopback up, or skips."""
    # Without root, a user namespace lets us make the network namespace (the demo command
    # then restores our uid in an inner one).
    prefix = ["unshare", "-n" if os.geteuid() == 0 else "-rn", "sh", "-c"]
    probe = subprocess.run(
        [*prefix, "ip link set lo up"], capture_output=True, text=True, timeout=60
    )
    if probe.returncode != 0 or shutil.which("ip") is None:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
    return prefix


def _python_for(uid: int) -> tuple[str, dict[str, str]]:
    """An interpreter ``uid`` can execute, and the environment that finds this checkout."""
    site = sysconfig.get_paths()["purelib"]
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{site}"}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        probe = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", python, "-c", ""],
            capture_output=True,
            timeout=60,
            env=_env(**env),
        )
        if probe.returncode == 0:
            return python, env
    pytest.skip(f"no {version} interpreter that uid {uid} may run")


def _run_in_netns(inner: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = "ip link set lo up && exec " + " ".join(f"'{a}'" for a in inner)
    return subprocess.run(
        [*_netns_prefix(), script],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
    )


def test_demo_as_a_normal_user_starts_an_embedded_server_without_a_reachable_one() -> None:
    pytest.importorskip("pgserver")
    cache = Path(tempfile.mkdtemp(prefix="llmgw-demo-user-"))
    cache.chmod(0o777)  # the unprivileged user writes its data here
    try:
        command = [sys.executable, "-m", "llm_gateway.cli", "demo"]
        extra: dict[str, str] = {"XDG_CACHE_HOME": str(cache)}
        if os.geteuid() == 0:
            python, found = _python_for(65534)
            extra |= found | {"HOME": "/nonexistent"}
            command = [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                python,
                *command[1:],
            ]
        else:
            command = [
                "unshare",
                "--user",
                f"--map-user={os.geteuid()}",
                f"--map-group={os.getegid()}",
                *command,
            ]
        proc = _run_in_netns(command, _env(**extra))
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        data = cache / "llm-gateway" / "pgdata"
        assert out.startswith(
            "No PostgreSQL reachable at postgresql://postgres@127.0.0.1:5432/postgres:"
            f" starting an embedded PostgreSQL in {data}\n"
        ), out
        assert "XDG_RUNTIME_DIR" not in out and "Traceback" not in out
        assert "failover: openrouter failed (HTTP 503" in out
        assert f"stays in {data}" in out
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_demo_as_root_in_a_container_loosens_no_home_or_venv_folder() -> None:
    pytest.importorskip("pgserver")
    if os.geteuid() != 0 or not in_container():
        pytest.skip("needs root in a container (the case where the demo runs pgserver as root)")
    guarded = _modes(_guarded_paths())
    temp = Path(tempfile.mkdtemp(prefix="llmgw-demo-root-"))
    temp.chmod(0o755)
    try:
        proc = _run_in_netns(
            [sys.executable, "-m", "llm_gateway.cli", "demo"], _env(TMPDIR=str(temp))
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        first = out.splitlines()[0]
        assert "root in a container" in first and "'pgserver'" in first
        assert str(temp / "llm-gateway-demo-0" / "pgdata") in first
        assert "XDG_RUNTIME_DIR" not in out and "Traceback" not in out
        assert "fallback: Globex has no llm7 key of its own" in out
        assert _modes(_guarded_paths()) == guarded
    finally:
        shutil.rmtree(temp, ignore_errors=True)
