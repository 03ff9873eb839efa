"""Packaging: declared dependencies and their tested lower bounds, licence, import-time errors."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOWEST = ROOT / "constraints" / "lowest.txt"
LOCAL = {"llm_gateway", "usage"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return _canonical(match.group(0))


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module imported -> files importing it, over both shipped packages."""
    found: dict[str, set[str]] = {}
    for package in sorted(LOCAL):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.partition(".")[0]
                    if top not in sys.stdlib_module_names and top not in LOCAL:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared() -> None:
    # An undeclared import (httpx2 was one) installs fine and fails at `import llm_gateway`.
    project = PYPROJECT["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    for extra, requirements in project["optional-dependencies"].items():
        if extra not in {"dev", "test"}:  # runtime extras only (pgserver: [embedded])
            declared |= {_requirement_name(r) for r in requirements}
    distributions = metadata.packages_distributions()
    missing = {
        module: sorted(files)
        for module, files in _third_party_imports().items()
        if not {_canonical(d) for d in distributions.get(module, [module])} & declared
    }
    assert missing == {}


def test_lowest_constraints_pin_every_lower_bound() -> None:
    # CI installs constraints/lowest.txt and runs the suite, so each declared lower bound is
    # a version the suite passed with; a bound changed without its pin would be untested.
    pins: dict[str, str] = {}
    for line in LOWEST.read_text().splitlines():
        line = line.partition("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_canonical(name)] = version.strip()
    # The extras the test extra pulls in (llm-gateway[server]) are installed with the pins too.
    requirements = list(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    for requirement in extras["test"]:
        own = re.fullmatch(r"llm-gateway\[([^\]]+)\]", requirement)
        for extra in own.group(1).split(",") if own else ():
            requirements += extras[extra.strip()]
    bounds: dict[str, str] = {}
    for requirement in requirements:
        match = re.search(r">=\s*([0-9][^,;\s]*)", requirement)
        assert match, f"{requirement!r} has no lower bound"
        bounds[_requirement_name(requirement)] = match.group(1)
    # Packages of the test suite (and the extras it tests) are pinned too: their pins are
    # their lower bounds, in every extra that names them.
    runtime = dict(bounds)
    for requirements in PYPROJECT["project"]["optional-dependencies"].values():
        for requirement in requirements:
            name = _requirement_name(requirement)
            if name in pins and name not in runtime:
                match = re.search(r">=\s*([0-9][^,;\s]*)", requirement)
                assert match and match.group(1) == pins[name], requirement
                bounds[name] = pins[name]
    assert pins == bounds


def test_license_file_is_apache_2_and_declared() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]


def test_own_usage_module_beside_script_names_the_cause(tmp_path: Path) -> None:
    shadow = tmp_path / "usage.py"
    shadow.write_text("# the user's own usage script\n")
    (tmp_path / "app.py").write_text("import llm_gateway\n")
    proc = subprocess.run(
        [sys.executable, "app.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:"), proc.stderr
    assert str(shadow) in last
    assert "shadows" in last and "rename" in last.lower()


def test_installed_layout_imports_cleanly(tmp_path: Path) -> None:
    # The guard must not fire on the normal layout (run from an unrelated directory).
    proc = subprocess.run(
        [sys.executable, "-c", "import llm_gateway, usage; print(usage.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve() == ROOT / "usage" / "__init__.py"


def _pytest_without_postgres(test_file: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TEST_DATABASE_URL": "postgresql://postgres:s3cret-pw@127.0.0.1:1/postgres",
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unreachable_postgres_stops_with_one_line() -> None:
    proc = _pytest_without_postgres("tests/test_migrate.py")
    output = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 1), output  # not "passed", not "tests failed"
    assert "Traceback" not in output, output
    assert not [line for line in output.splitlines() if line.startswith(("E ", "ERROR "))], output
    lines = [line for line in output.splitlines() if "TEST_DATABASE_URL" in line]
    assert len(lines) == 1, output
    assert "127.0.0.1:1" in lines[0]
    assert "s3cret-pw" not in output


def test_tests_without_postgres_run_without_it() -> None:
    proc = _pytest_without_postgres("tests/test_config.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
