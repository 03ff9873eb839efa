"""Helpers shared by the bench scripts: CPU pinning, simulator processes, tables, databases.

Not a benchmark itself. The bench scripts are run as ``python bench/<name>.py``, which puts
this folder on ``sys.path``, so they ``import _common``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADMIN_DSN = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


# --- CPU pinning ---------------------------------------------------------------------------

# The CPUs this process could use at start, before any pinning narrowed them.
_ALLOWED: frozenset[int] = frozenset(
    os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ()
)


def can_pin(cpu: int) -> bool:
    """Whether this process may be pinned to ``cpu`` (Linux, and the CPU exists)."""
    return hasattr(os, "sched_setaffinity") and cpu in _ALLOWED


def pin_self(cpu: int) -> str:
    """Pin the calling process to ``cpu``; returns a description for the report."""
    if not can_pin(cpu):
        return f"not pinned (CPU {cpu} not available: {sorted(_ALLOWED)})"
    os.sched_setaffinity(0, {cpu})
    return f"CPU {cpu}"


def _pin_child(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


# --- simulated providers in their own processes --------------------------------------------


@dataclass(frozen=True, slots=True)
class SimProcess:
    """A ``python -m llm_gateway.simulator`` child process and where it listens."""

    name: str
    base_url: str  # http://127.0.0.1:PORT/v1
    pid: int
    cpu: int | None

    @property
    def root_url(self) -> str:
        """The URL without ``/v1`` (what the groq SDK wants)."""
        return self.base_url.removesuffix("/v1")


@contextlib.contextmanager
def simulator(
    name: str,
    *,
    cpu: int | None = 1,
    fail_with: str | None = None,
    extra_args: Sequence[str] = (),
    start_timeout: float = 20.0,
) -> Iterator[SimProcess]:
    """Run a simulated provider on a free loopback port, pinned to ``cpu``, until exit.

    The child prints its base URL once it listens; it is stopped with SIGTERM (then SIGKILL).
    """
    pin = cpu if cpu is not None and can_pin(cpu) else None
    args = [sys.executable, "-m", "llm_gateway.simulator", "--port", "0", "--name", name]
    if fail_with is not None:
        args += ["--fail-with", fail_with]
    args += list(extra_args)
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        text=True,
        preexec_fn=lambda: _pin_child(pin),  # affinity set in the child
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], start_timeout)
        line = proc.stdout.readline().strip() if ready else ""
        if not re.match(r"^http://[^/]+/v1$", line):
            raise RuntimeError(f"simulator {name!r} did not start (printed {line!r})")
        yield SimProcess(name, line, proc.pid, pin)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def refused_url() -> str:
    """A loopback base URL that refuses connections (a port bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# --- databases -----------------------------------------------------------------------------


def dsn_for(admin_dsn: str, database: str) -> str:
    """``admin_dsn`` pointing at another database of the same server."""
    base, _, query = admin_dsn.partition("?")
    scheme, _, rest = base.partition("://")
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/{database}" + (f"?{query}" if query else "")


@contextlib.asynccontextmanager
async def scratch_database(admin_dsn: str, name: str, *, keep: bool = False) -> AsyncIterator[str]:
    """Create database ``name`` (dropping a leftover one), yield its DSN, drop it at the end."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"unsafe database name {name!r}")
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    try:
        yield dsn_for(admin_dsn, name)
    finally:
        if not keep:
            admin = await asyncpg.connect(admin_dsn)
            try:
                await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            finally:
                await admin.close()


# --- figures and tables --------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values``, nearest-rank on the sorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]


def print_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[object]], note: str = ""
) -> None:
    """A plain-text table (first column left-aligned, the others right-aligned)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(values)]
        return "  ".join(parts).rstrip()

    print(f"\n{title}")
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))
    if note:
        print(note)


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    """The 1/5/15-minute load averages: other work on the machine skews every figure."""
    if not hasattr(os, "getloadavg"):
        return "load average unknown"
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def git_state() -> str:
    """The commit measured, and whether the working tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "llm_gateway", "usage"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}" + (" + uncommitted changes in llm_gateway/ or usage/" if dirty else "")


def environment(packages: Sequence[str]) -> str:
    """Date, code version, Python, CPUs and load, package versions: one line each."""
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"code: {git_state()}",
        f"python: {platform.python_implementation()} {platform.python_version()}"
        f" on {platform.system()} {platform.release()} ({platform.machine()})",
        f"cpus: {os.cpu_count()}; {load_average()}",
        "packages: " + ", ".join(f"{p} {package_version(p)}" for p in packages),
    ]
    return "\n".join(lines)
