"""The local append-only spool: usage rows PostgreSQL could not take (yet).

Format: one file per batch, ``usage-<time_ns:020>-<pid>-<seq:06>-n<rows>.jsonl``, so the name
sorts in write order and tells the row count without opening the file. The first line is a
header ``{"llm_gateway_spool": 1, "rows": N, "columns": [...], ...}``; each following line is
one row as a JSON object keyed by :data:`usage.record.COLUMNS` (uuids, decimals and
timestamps as strings). Each file is fsynced, then its directory.

Concurrency: a writer creates the file under a hidden temporary name, takes ``flock(LOCK_EX)``,
renames it to its final name and only then writes, so a replayer never sees a file that is
still being written. A replayer takes the same lock without blocking (skips the file if it is
held), checks that the name still points to the locked inode, and deletes the file only after
PostgreSQL confirmed its rows. The lock dies with the process, so a crashed replayer frees
its file. Replays are idempotent on the row id, so a crash between commit and delete is safe.

A line that does not parse (torn write, disk corruption) is logged, counted, copied to
``rejected/`` and skipped; the rest of the file is replayed.

Trust: the folder is created ``0700``. An existing folder must belong to this process's user
and must not be group- or world-writable, else :class:`SpoolPermissionError` (an ``OSError``)
is raised: another local user could otherwise plant usage rows. A folder that is only
readable by others (made by an older version) is tightened to ``0700``. A spool file that is
not a regular file owned by this user is never read: it is moved to ``rejected/`` as
``foreign-<name>`` and counted.

All methods block (file I/O and fsync): call them from a worker thread in async code.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from .record import COLUMNS, UsageRecord
from .spool_codec import decode_row, dumps, encode_row, loads

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: single-process spool only
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SPOOL_VERSION",
    "ClaimedFile",
    "Spool",
    "SpoolFile",
    "SpoolPermissionError",
    "default_spool_dir",
]

log = logging.getLogger("usage")

SPOOL_VERSION: Final = 1
_NAME = re.compile(r"^usage-(\d{20})-(\d+)-(\d{6})-n(\d+)\.jsonl$")
_TMP_PREFIX = ".tmp-"


def default_spool_dir() -> Path:
    """``$LLM_GATEWAY_SPOOL_DIR``, else ``$XDG_CACHE_HOME/llm-gateway/spool`` (``~/.cache``)."""
    env = os.environ.get("LLM_GATEWAY_SPOOL_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "llm-gateway" / "spool"


class SpoolPermissionError(PermissionError):
    """The spool folder is not private to this user: refusing to trust what is in it."""


def _private_dir(directory: Path) -> None:
    """Create ``directory`` 0700, or check that an existing one is ours and not writable
    by others (tightening one that others can only read)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(directory, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise SpoolPermissionError(f"usage spool {directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise SpoolPermissionError(
            f"usage spool {directory} belongs to uid {st.st_uid}, not to this process"
            f" (uid {os.geteuid()}): refusing to replay rows others could have written"
        )
    if st.st_mode & 0o022:
        raise SpoolPermissionError(
            f"usage spool {directory} is writable by group or others"
            f" (mode {stat.S_IMODE(st.st_mode):04o}): run chmod 700 on it"
        )
    if st.st_mode & 0o077:
        os.chmod(directory, 0o700)
        log.info("usage spool %s: tightened to mode 0700", directory)


# --- files ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpoolFile:
    """A spool file waiting for replay; ``rows`` is the count its name declares, ``pid``
    the process that wrote it."""

    path: Path
    rows: int
    pid: int = 0


@dataclass(slots=True)
class ClaimedFile:
    """A spool file locked by this process for replay, with its rows parsed.

    ``bad_lines`` are 1-based line numbers that did not parse; ``missing_rows`` counts rows the
    header announced but the file does not hold (cut at a line boundary). Call :meth:`done`
    once PostgreSQL confirmed :attr:`rows`, or :meth:`release` to leave the file for later.
    """

    path: Path
    rows: list[UsageRecord]
    bad_lines: list[int] = field(default_factory=list)
    missing_rows: int = 0
    declared_rows: int = 0
    bad_raw: list[bytes] = field(default_factory=list)
    _fd: int = -1

    def done(self) -> None:
        """Delete the file (its rows are in PostgreSQL) and drop the lock."""
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        finally:
            self.release()

    def release(self) -> None:
        """Drop the lock and keep the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, chunks: Iterable[bytes]) -> None:
    data = memoryview(b"".join(chunks))
    while data:
        data = data[os.write(fd, data) :]


class Spool:
    """A spool directory (created if missing) with a ``rejected/`` folder beside the batches.

    ``pending_files`` and ``pending_rows`` count the files waiting for replay, as of the last
    :meth:`files` scan plus what this object wrote and replayed since.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.rejected_dir = self.directory / "rejected"
        _private_dir(self.directory)
        _private_dir(self.rejected_dir)
        self._seq = itertools.count()
        self.pending_files = 0
        self.pending_rows = 0
        self.foreign_files = 0  # files set aside because they were not ours

    def _new_name(self, prefix: str, rows: int) -> str:
        seq = next(self._seq) % 1_000_000
        return f"{prefix}-{time.time_ns():020d}-{os.getpid()}-{seq:06d}-n{rows}.jsonl"

    def _write_file(self, directory: Path, name: str, lines: Iterable[bytes]) -> Path:
        tmp = directory / f"{_TMP_PREFIX}{name}"
        final = directory / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else knows this name yet: never waits
            os.rename(tmp, final)  # visible only while locked, so no replayer reads it half-done
            try:
                _write_all(fd, lines)
                os.fsync(fd)
            except BaseException:
                final.unlink(missing_ok=True)
                raise
        finally:
            os.close(fd)
        _fsync_dir(directory)
        return final

    def write(self, rows: Sequence[UsageRecord]) -> Path:
        """Append one batch as a new durable file (fsynced with its directory)."""
        name = self._new_name("usage", len(rows))
        header = dumps(
            {
                "llm_gateway_spool": SPOOL_VERSION,
                "rows": len(rows),
                "columns": COLUMNS,
                "pid": os.getpid(),
                "written_at": time.time(),
            }
        )
        path = self._write_file(
            self.directory, name, itertools.chain((header + b"\n",), map(encode_row, rows))
        )
        self.pending_files += 1
        self.pending_rows += len(rows)
        return path

    def reject(self, rows: Sequence[tuple[UsageRecord, str]]) -> Path:
        """Keep rows PostgreSQL refused (bad values) in ``rejected/``, with the error."""
        name = self._new_name("rejected", len(rows))
        lines = (encode_row(rec, {"_error": err[:500]}) for rec, err in rows)
        return self._write_file(self.rejected_dir, name, lines)

    def save_corrupt(self, source: Path, lines: Sequence[bytes]) -> Path:
        """Keep the raw lines of ``source`` that did not parse, for an operator to inspect."""
        name = f"corrupt-{time.time_ns():020d}-{source.name}"
        return self._write_file(self.rejected_dir, name, (line + b"\n" for line in lines))

    def files(self) -> list[SpoolFile]:
        """Spool files waiting for replay, oldest first; refreshes the pending counters."""
        found: list[SpoolFile] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                match = _NAME.match(entry.name)
                if match is not None:
                    found.append(SpoolFile(Path(entry.path), int(match[4]), int(match[2])))
        found.sort(key=lambda f: f.path.name)
        self.pending_files = len(found)
        self.pending_rows = sum(f.rows for f in found)
        return found

    def complete(self, claimed: ClaimedFile) -> None:
        """Delete a claimed file whose rows PostgreSQL confirmed, and drop its lock.

        Lines that could not be read are first copied to ``rejected/``.
        """
        if claimed.bad_raw:
            try:
                self.save_corrupt(claimed.path, claimed.bad_raw)
            except OSError as exc:
                log.error("could not keep corrupt lines of %s: %s", claimed.path.name, exc)
        claimed.done()
        self.pending_files = max(0, self.pending_files - 1)
        self.pending_rows = max(0, self.pending_rows - claimed.declared_rows)

    def remove_stale_tmp(self, older_than: float = 3600.0) -> int:
        """Delete leftover temporary names (a writer died before its rename: they are empty)."""
        removed = 0
        cutoff = time.time() - older_than
        for path in self.directory.glob(f"{_TMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    def _set_aside(self, path: Path, why: str) -> None:
        """Move a file we must not trust to ``rejected/foreign-<name>`` without reading it."""
        target = self.rejected_dir / f"foreign-{time.time_ns():020d}-{path.name}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return
        self.foreign_files += 1
        self.pending_files = max(0, self.pending_files - 1)
        log.warning("spool file %s %s: set aside as %s, not replayed", path.name, why, target.name)

    def claim(self, path: Path) -> ClaimedFile | None:
        """Lock ``path`` and parse it; ``None`` if gone, held by another process, or not
        ours (then it is set aside in ``rejected/``)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError:
            if os.path.islink(path):  # O_NOFOLLOW refused a symlink
                self._set_aside(path, "is a symbolic link")
                return None
            raise
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            regular = stat.S_ISREG(st.st_mode)
            self._set_aside(path, f"belongs to uid {st.st_uid}" if regular else "is not a file")
            return None
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    return None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # replayed and deleted by another process after our open
                os.close(fd)
                return None
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = fh.read()
        except BaseException:
            os.close(fd)
            raise
        claimed = self._parse(path, data)
        claimed._fd = fd
        match = _NAME.match(path.name)
        claimed.declared_rows = int(match[4]) if match else len(claimed.rows)
        return claimed

    def _parse(self, path: Path, data: bytes) -> ClaimedFile:
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # the file ends with a newline: no partial last line
        rows: list[UsageRecord] = []
        bad: list[int] = []
        bad_raw: list[bytes] = []
        expected: int | None = None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = loads(line)
                if number == 1 and isinstance(obj, dict) and "llm_gateway_spool" in obj:
                    expected = int(obj["rows"])
                    continue
                rows.append(decode_row(obj))
            except Exception as exc:  # any unreadable line is skipped, never fatal
                bad.append(number)
                bad_raw.append(line)
                log.error(
                    "spool file %s line %d is corrupt and skipped (%s)",
                    path.name,
                    number,
                    type(exc).__name__,
                )
        missing = max(0, expected - len(rows) - len(bad)) if expected is not None else 0
        if missing:
            log.error("spool file %s is missing %d rows (truncated)", path.name, missing)
        return ClaimedFile(path, rows, bad, missing, bad_raw=bad_raw)
