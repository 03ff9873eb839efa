"""The demo's embedded PostgreSQL (the ``pgserver`` extra), started only where that is safe.

As a normal user pgserver runs its bundled binaries in place with data under the user's cache
folder and changes no permissions. As root it creates a ``pgserver`` system user, chowns the data
folder to it, and makes every parent folder of the data and of its binaries world-traversable:
with the binaries inside a virtualenv under ``/root`` that would open up ``/root``. So as root:

* in a container or CI image (root is the normal user there) the binaries are copied to, and
  the data kept in, a folder under the system temp folder, whose parents are already
  traversable: pgserver then loosens nothing but that folder;
* elsewhere the embedded server is refused, with one line saying what to run instead.
"""

from __future__ import annotations

import importlib
import os
import shutil
import stat
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .errors import DatabaseError

__all__ = ["EmbeddedPlan", "in_container", "install_hint", "plan_embedded", "start_embedded"]

_SYSTEM_USER = "pgserver"  # the user pgserver itself creates and runs as, when run as root


def in_container() -> bool:
    """Whether this process runs in a container or CI job, where root is the normal user."""
    # systemd-nspawn/podman set lowercase ``container``; CI services set ``CI``.
    if os.environ.get("container") or os.environ.get("CI", "").lower() in {"1", "true"}:  # noqa: SIM112
        return True
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists():
        return True
    try:
        cgroup = Path("/proc/1/cgroup").read_text()
    except OSError:
        return False
    return any(m in cgroup for m in ("docker", "kubepods", "containerd", "libpod", "lxc"))


def install_hint() -> str:
    """The one command that installs the embedded server into this interpreter."""
    repo = Path(__file__).resolve().parent.parent
    pyproject = repo / "pyproject.toml"
    if pyproject.is_file() and 'name = "llm-gateway"' in pyproject.read_text():
        # A source checkout. "llm-gateway[embedded]" from the index is an unrelated package.
        return f"{sys.executable} -m pip install -e '{repo}[embedded]'"
    return f"{sys.executable} -m pip install 'pgserver>=0.1.4'"


@dataclass(frozen=True, slots=True)
class EmbeddedPlan:
    """Where the embedded server keeps its data, and its binaries if they must be copied."""

    data: Path
    binaries: Path | None  # a copy of pgserver's ``pginstall`` (root only), else used in place
    note: str  # the one line the demo prints before starting it


def _traversable_by_all(folder: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in (folder, *folder.parents))


def plan_embedded(
    *, euid: int, container: bool, cache_home: Path, temp: Path, cause: str
) -> EmbeddedPlan:
    """Decide where (and whether) the embedded server may run. ``cause`` says why it is needed.

    Raises :class:`DatabaseError` with what to run instead where it may not.
    """
    if euid != 0:
        data = cache_home / "llm-gateway" / "pgdata"
        return EmbeddedPlan(data, None, f"{cause}: starting an embedded PostgreSQL in {data}")
    if not container:
        raise DatabaseError(
            f"{cause}; as root outside a container the embedded PostgreSQL is not started"
            f" (pgserver would add a system user and open up folder permissions): start"
            f" PostgreSQL and set DATABASE_URL, or run `llm-gateway demo` as a normal user"
        )
    if not _traversable_by_all(temp):
        raise DatabaseError(
            f"{cause}; the temp folder {temp} is not traversable by other users, so the embedded"
            f" PostgreSQL (run as system user {_SYSTEM_USER!r}) cannot start there without"
            f" loosening permissions: start PostgreSQL and set DATABASE_URL"
        )
    base = temp / f"llm-gateway-demo-{euid}"
    return EmbeddedPlan(
        base / "pgdata",
        base / "binaries",
        f"{cause}: root in a container, so starting an embedded PostgreSQL as system user"
        f" {_SYSTEM_USER!r} (created if absent), binaries copied to {base / 'binaries'},"
        f" data in {base / 'pgdata'}; no other folder's permissions change",
    )


def _import_pgserver() -> ModuleType:
    # pgserver asks platformdirs for a runtime folder at import; under su/ssh/docker
    # XDG_RUNTIME_DIR is unset and platformdirs warns, then uses a temp folder, which is fine.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import pgserver

    module: ModuleType = pgserver
    return module


def _use_copied_binaries(target: Path) -> None:
    """Copy pgserver's binaries under ``target`` (once) and point pgserver at the copy.

    The wheel's binaries find their shared libraries through an RPATH relative to themselves
    (``$ORIGIN/../../../pgserver.libs``), so the copy keeps that layout.
    """
    commands = importlib.import_module("pgserver._commands")
    server = importlib.import_module("pgserver.postgres_server")
    install = Path(commands.POSTGRES_BIN_PATH).parent  # .../site-packages/pgserver/pginstall
    libs = install.parent.parent / "pgserver.libs"
    stamp = f"{install} {(install / 'bin' / 'postgres').stat().st_mtime_ns}\n"
    marker = target / ".copied-from"
    if not marker.is_file() or marker.read_text() != stamp:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(mode=0o755, parents=True)
        shutil.copytree(install, target / "pgserver" / "pginstall", symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, target / "pgserver.libs", symlinks=True)
        marker.write_text(stamp)
    # Both modules read the path at call time: initdb/pg_ctl, and the permission fix-ups.
    for module in (commands, server):
        vars(module)["POSTGRES_BIN_PATH"] = target / "pgserver" / "pginstall" / "bin"


def start_embedded(cause: str) -> tuple[str, Path]:
    """Start (or reuse) the embedded PostgreSQL; return its DSN and data folder.

    ``cause`` is why (e.g. "no PostgreSQL reachable at ..."). Raises :class:`DatabaseError`
    with one accurate hint where it cannot or may not run.
    """
    euid = os.geteuid() if hasattr(os, "geteuid") else 1
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    plan = plan_embedded(
        euid=euid,
        container=euid == 0 and in_container(),
        cache_home=cache_home,
        temp=Path(tempfile.gettempdir()),
        cause=cause,
    )
    try:
        pgserver = _import_pgserver()
    except ImportError:
        raise DatabaseError(
            f"{cause}: start PostgreSQL and set DATABASE_URL, or install the embedded one"
            f" with `{install_hint()}`"
        ) from None
    print(plan.note, flush=True)
    try:
        if plan.binaries is not None:
            _use_copied_binaries(plan.binaries)
        plan.data.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        server = pgserver.get_server(str(plan.data))
        return str(server.get_uri()), plan.data
    except Exception as exc:  # pgserver raises CalledProcessError, OSError, AssertionError...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseError(
            f"the embedded PostgreSQL did not start ({detail}); its log is {plan.data / 'log'}"
        ) from exc
