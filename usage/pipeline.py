"""The writer side of a tracker: one task draining the queue to PostgreSQL or the spool.

Invariants: a row leaves memory (``_queue`` / ``_inflight``) only after PostgreSQL confirmed
it, it was fsynced to the spool, or PostgreSQL refused it and it was kept in ``rejected/``.
A batch that may already be in the table (any retry, any replay) is written with the
idempotent upsert, so nothing is ever stored twice. The one exception is the hard cap
(``max_queued``): a row recorded while that many are in memory is dropped -- counted in
``backlog().dropped_rows`` and logged -- because memory must not grow without bound while
PostgreSQL hangs and the spool cannot be written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from . import writer as w
from .connection import WriterLink
from .pricing import PriceBook
from .record import UsageRecord
from .rollup import PendingRollup
from .spool import Spool
from .stats import UsageBacklog

log = logging.getLogger("usage")

_BACKOFF_START = 0.05
_REPLAY_CHECK_INTERVAL = 60.0  # look for files left by other (dead) processes
# While PostgreSQL is away, rows gather this long before they go to the spool: one fsynced
# file per second (or per batch_size rows) instead of one per flush_interval.
_SPOOL_INTERVAL = 1.0
# Replay spool files for at most this long in one idle pass, so new rows never wait long.
_REPLAY_SLICE = 0.25


class UsagePipeline:
    """Queue, writer loop, spool and counters; :class:`~usage.ModelUsageTracker` is the API."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool[asyncpg.Record] | None,
        batch_size: int,
        flush_interval: float,
        high_water: int,
        max_queued: int,
        spool_dir: Path,
        grace_period: float,
        maintenance_interval: float,
        connect_timeout: float,
        write_timeout: float,
        max_backoff: float,
        price_book: PriceBook,
    ) -> None:
        self._link = WriterLink(pool, connect_timeout=connect_timeout, write_timeout=write_timeout)
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._high_water = high_water
        self._max_queued = max_queued
        self._spool_dir = spool_dir
        self._grace = grace_period
        self._maintenance_interval = maintenance_interval
        self._max_backoff = max_backoff
        self._prices = price_book

        self._queue: deque[UsageRecord] = deque()
        self._inflight: list[UsageRecord] = []
        self._attempts = 0  # failed tries of the in-flight batch: > 0 means "maybe written"
        self._poisoned = False  # the in-flight batch holds a row PostgreSQL refuses
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._spool: Spool | None = None
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._listeners: list[Callable[[Sequence[UsageRecord]], None]] = []

        self._settled = 0  # live rows that left memory: written, spooled or rejected
        self._written = 0
        self._duplicates = 0
        self._spooled = 0
        self._replayed = 0
        self._rejected = 0
        self._corrupt = 0
        self._failed_batches = 0
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None
        self._down_since: float | None = None
        self._next_probe = 0.0
        self._next_maintenance = 0.0
        self._next_replay_check = 0.0
        self._replay_due = False
        self._spool_logged = False  # one warning per outage
        self._spool_broken = False  # the last spool write failed
        self._unremovable: set[Path] = set()  # unreadable/undeletable: skipped by this process
        self._dropped = 0  # rows refused by record() at the hard cap
        self._drop_episode = 0  # dropped since the last "queue full" log line
        self._rollup = PendingRollup(first_backoff=max_backoff, max_backoff=maintenance_interval)
        self._rollup_task: asyncio.Task[None] | None = None

    # --- counters ------------------------------------------------------------------------

    def backlog(self) -> UsageBacklog:
        """Counters for alerting: what is queued, spooled, written and failing."""
        spool = self._spool
        return UsageBacklog(
            queued=self._in_memory(),
            in_flight=len(self._inflight),
            spooled_rows=spool.pending_rows if spool else 0,
            spooled_files=spool.pending_files if spool else 0,
            written_rows=self._written,
            duplicate_rows=self._duplicates,
            spooled_total=self._spooled,
            replayed_rows=self._replayed,
            rejected_rows=self._rejected,
            corrupt_lines=self._corrupt,
            failed_batches=self._failed_batches,
            dropped_rows=self._dropped,
            foreign_files=spool.foreign_files if spool else 0,
            rollup_pending=len(self._rollup),
            database_available=self._down_since is None,
            last_error=self._last_error,
            last_error_at=self._last_error_at,
        )

    def _in_memory(self) -> int:
        return len(self._inflight) + len(self._queue)

    def add_settle_listener(self, listener: Callable[[Sequence[UsageRecord]], None]) -> None:
        """Call ``listener(rows)`` each time live rows leave memory: written to PostgreSQL,
        spooled (counted when replayed) or rejected. Runs in the writer task: keep it cheap;
        its errors are logged, never raised."""
        self._listeners.append(listener)

    def _left_memory(self, rows: Sequence[UsageRecord]) -> None:
        for listener in self._listeners:
            try:
                listener(rows)
            except Exception:
                log.exception("usage settle listener failed")

    def _settle(self, n: int) -> None:
        self._settled += n
        if self._flush_waiters:
            self._notify_flush()

    def _notify_flush(self) -> None:
        for target, waiter in self._flush_waiters:
            if self._settled >= target and not waiter.done():
                waiter.set_result(None)

    def _note_failure(self, exc: BaseException, what: str) -> None:
        self._failed_batches += 1
        self._last_error = w.describe_error(exc)
        self._last_error_at = datetime.now(UTC)
        now = time.monotonic()
        self._next_probe = now + self._max_backoff
        if self._down_since is None:
            self._down_since = now
            log.warning("%s: %s", what, self._last_error)

    def _degraded(self, now: float) -> bool:
        return self._down_since is not None and now - self._down_since >= self._grace

    # --- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                try:
                    if self._drop_episode and self._in_memory() <= self._max_queued // 2:
                        log.warning(
                            "usage queue below its cap again; %d rows were dropped while full",
                            self._drop_episode,
                        )
                        self._drop_episode = 0
                    if self._down_since is None and time.monotonic() >= self._next_maintenance:
                        self._start_maintenance()
                    if not self._inflight:
                        queue = self._queue
                        if (
                            len(queue) < self._batch_size
                            and not self._stop.is_set()
                            and not (self._flush_waiters and queue)
                        ):
                            await self._replay_when_idle()
                            await self._wait(self._idle_timeout())
                        if not queue:
                            if self._stop.is_set():
                                await self._replay_at_close()
                                return
                            continue
                        if len(queue) > self._high_water and not self._stop.is_set():
                            await self._spill()
                            continue
                        n = min(len(queue), self._batch_size)
                        self._inflight = [queue.popleft() for _ in range(n)]
                        self._attempts = 0
                        self._poisoned = False
                    await self._process_inflight()
                    if self._stop.is_set() and self._spool_broken:
                        return  # close() keeps trying once and reports what it could not save
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug must not stop the writer: the rows stay queued
                    log.exception("usage writer: unexpected error")
                    if self._stop.is_set():
                        return  # close() spools what is left
                    await self._sleep(self._max_backoff)
        except asyncio.CancelledError:
            if not self._stop.is_set():  # cancelled from outside (loop shutdown): keep rows
                self._spool_memory_sync("writer cancelled")
            raise

    def _idle_timeout(self) -> float:
        """How long the writer waits for more rows: longer while rows can only be spooled,
        but no later than the next probe of PostgreSQL."""
        now = time.monotonic()
        if self._degraded(now):
            return max(self._flush_interval, min(_SPOOL_INTERVAL, self._next_probe - now))
        return self._flush_interval

    async def _wait(self, timeout: float) -> None:
        if not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        self._wake.clear()

    async def _sleep(self, seconds: float) -> None:
        """Back off, but wake at once when close() is called."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def _process_inflight(self) -> None:
        now = time.monotonic()
        if self._degraded(now) and now < self._next_probe:
            await self._spool_inflight()  # PostgreSQL is away: only probes try it
            return
        try:
            if self._poisoned:
                pending = [self._inflight]
                try:
                    await self._write_isolating(pending, live=True)
                finally:
                    self._inflight = [r for part in pending for r in part]
            else:
                rows = self._inflight
                inserted = await self._link.write(rows, idempotent=self._attempts > 0)
                self._inflight = []
                self._confirmed(len(rows), inserted, live=True)
                self._left_memory(rows)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._attempts += 1
            kind = w.classify_error(exc)
            if kind == "duplicate":
                log.info("batch already partly stored; rewriting it idempotently")
                return
            if kind == "poison":
                log.warning("PostgreSQL refused a batch (%s); isolating", w.describe_error(exc))
                self._poisoned = True
                return
            self._note_failure(exc, "usage write failed, retrying")
            now = time.monotonic()
            if (
                (self._stop.is_set() and self._attempts >= 2)
                or self._degraded(now)
                or len(self._queue) > self._high_water
            ):
                await self._spool_inflight()
            elif not self._stop.is_set():
                delay = min(self._max_backoff, _BACKOFF_START * 2 ** (self._attempts - 1))
                await self._sleep(delay * random.uniform(0.5, 1.0))

    def _confirmed(self, n: int, inserted: int, *, live: bool) -> None:
        self._written += n
        self._duplicates += n - inserted
        if self._down_since is not None:
            log.info("PostgreSQL accepts usage rows again")
            self._down_since = None
            self._spool_logged = False
            self._replay_due = True
        if live:
            self._settle(n)

    async def _write_isolating(self, pending: list[list[UsageRecord]], *, live: bool) -> None:
        """Write idempotently, halving parts that fail with a data error down to single rows,
        which go to ``rejected/``. On a transient error, ``pending`` holds what is left."""
        while pending:
            part = pending.pop()
            try:
                inserted = await self._link.write(part, idempotent=True)
            except BaseException as exc:  # incl. cancellation: the part must stay pending
                if not isinstance(exc, Exception) or w.classify_error(exc) != "poison":
                    pending.append(part)
                    raise
                if len(part) > 1:
                    mid = len(part) // 2
                    pending.extend((part[mid:], part[:mid]))
                    continue
                assert self._spool is not None
                error = w.describe_error(exc)
                try:
                    await asyncio.to_thread(self._spool.reject, [(part[0], error)])
                except BaseException:
                    pending.append(part)
                    raise
                self._rejected += 1
                log.error("PostgreSQL refused usage row %s: %s", getattr(part[0], "id", "?"), error)
                if live:
                    self._settle(1)
                    self._left_memory(part)
            else:
                self._confirmed(len(part), inserted, live=live)
                if live:
                    self._left_memory(part)

    # --- spool ---------------------------------------------------------------------------

    async def _spool_chunk(self, rows: list[UsageRecord]) -> bool:
        """Write one spool file. The caller drops the rows from memory only on True."""
        try:
            if self._spool is None:
                self._spool = Spool(self._spool_dir)
            await asyncio.to_thread(self._spool.write, rows)
        except OSError as exc:
            log.error("cannot write the usage spool (%s): rows stay in memory", exc)
            self._last_error = w.describe_error(exc)
            self._spool_broken = True
            return False
        self._spool_broken = False
        self._spooled += len(rows)
        self._replay_due = True
        self._settle(len(rows))
        self._left_memory(rows)
        return True

    async def _spool_inflight(self, *, wait_on_error: bool = True) -> bool:
        """Move the in-flight rows to the spool, a file per batch. True when all are on disk."""
        if self._inflight and not self._spool_logged:
            self._spool_logged = True
            log.warning(
                "usage rows go to the spool in %s until PostgreSQL takes them", self._spool_dir
            )
        while self._inflight:
            chunk = self._inflight[: self._batch_size]
            if not await self._spool_chunk(chunk):
                if wait_on_error:
                    await self._sleep(self._max_backoff)
                return False
            self._inflight = self._inflight[len(chunk) :]
        return True

    async def _spill(self) -> None:
        """The queue passed high water: move its oldest rows to the spool."""
        log.warning("usage queue above high water (%d rows): spooling", len(self._queue))
        while len(self._queue) > self._high_water:
            n = min(self._batch_size, len(self._queue))
            self._inflight = [self._queue.popleft() for _ in range(n)]
            if not await self._spool_inflight():
                return

    def _spool_memory_sync(self, reason: str) -> None:
        """Last resort when no event loop will run again: spool what is in memory, blocking."""
        rows = self._inflight + list(self._queue)
        if not rows:
            return
        try:
            spool = self._spool or Spool(self._spool_dir)
            spool.write(rows)
        except OSError as exc:
            log.critical("%s: could not spool %d usage rows: %s", reason, len(rows), exc)
            return
        self._inflight = []
        self._queue.clear()
        self._spooled += len(rows)
        self._settled += len(rows)
        log.warning("%s: spooled %d usage rows", reason, len(rows))

    async def _replay_one(self) -> bool:
        """Replay the oldest spool file nobody else holds. False when there is nothing to do
        or PostgreSQL failed."""
        assert self._spool is not None
        spool = self._spool
        claimed = None
        try:
            for entry in await asyncio.to_thread(spool.files):
                if entry.path in self._unremovable:
                    continue
                try:
                    claimed = await asyncio.to_thread(spool.claim, entry.path)
                except OSError as exc:  # e.g. unreadable: leave it for an operator
                    log.error("cannot read spool file %s: %s", entry.path.name, exc)
                    self._unremovable.add(entry.path)
                    continue
                if claimed is not None:
                    break
        except OSError as exc:
            log.error("cannot list the spool %s: %s", spool.directory, exc)
        if claimed is None:
            self._replay_due = False
            return False
        try:
            rows = claimed.rows
            pending = [
                rows[i : i + self._batch_size] for i in range(0, len(rows), self._batch_size)
            ]
            pending.reverse()
            await self._write_isolating(pending, live=False)
        except asyncio.CancelledError:
            claimed.release()
            raise
        except Exception as exc:
            claimed.release()
            self._note_failure(exc, f"replay of {claimed.path.name} failed")
            return False
        try:
            await asyncio.to_thread(spool.complete, claimed)
        except OSError as exc:  # the rows are in; do not replay it again in this process
            claimed.release()
            self._unremovable.add(claimed.path)
            log.error("cannot delete replayed spool file %s: %s", claimed.path.name, exc)
        if rows:
            newest = max(r.timestamp for r in rows) + timedelta(microseconds=1)  # end: exclusive
            # Recomputed once per replay pass (see _replay_when_idle), not once per file.
            self._rollup.add(min(r.timestamp for r in rows), newest)
        self._corrupt += len(claimed.bad_lines) + claimed.missing_rows
        self._replayed += len(claimed.rows)
        log.info("replayed %d usage rows from %s", len(claimed.rows), claimed.path.name)
        return True

    # --- housekeeping --------------------------------------------------------------------

    def _start_maintenance(self) -> None:
        """Run maintenance in its own task, so writes go on while it works."""
        if self._maintenance is None or self._maintenance.done():
            self._next_maintenance = time.monotonic() + self._maintenance_interval
            self._maintenance = asyncio.get_running_loop().create_task(
                self._link.maintain(self._prices), name="llm-gateway-usage-maintenance"
            )

    async def _replay_when_idle(self) -> None:
        """Replay spool files while the queue is short (the spool is durable: no hurry), for
        at most a short slice, so live rows keep flowing; retry pending rollup refreshes."""
        now = time.monotonic()
        if self._down_since is None:
            if now >= self._next_replay_check:
                self._next_replay_check = now + _REPLAY_CHECK_INTERVAL
                self._replay_due = True  # files left by another process that died
            until = now + max(self._flush_interval, _REPLAY_SLICE)
            while (
                self._replay_due
                and len(self._queue) < self._batch_size
                and not self._stop.is_set()
                and await self._replay_one()
                and time.monotonic() < until
            ):
                pass
            self._start_rollup_refresh()
        elif self._degraded(now) and now >= self._next_probe and self._replay_due:
            await self._replay_one()  # doubles as the probe when no live rows arrive

    def _start_rollup_refresh(self) -> None:
        """Recompute pending rollup hours in their own task: a refresh waiting on a lock must
        not hold up the writer."""
        if self._rollup.due() and (self._rollup_task is None or self._rollup_task.done()):
            self._rollup_task = asyncio.get_running_loop().create_task(
                self._rollup.refresh(self._link), name="llm-gateway-usage-rollup"
            )

    async def _replay_at_close(self) -> None:
        """At close, with PostgreSQL up, replay the spool -- what this process spooled during
        an outage, and any older files. close()'s deadline cancels this; a file cut short
        stays for the next start (replays are idempotent)."""
        if self._spool is None or self._spool.pending_files == 0:
            return
        # While the writer believes PostgreSQL is away, the first replay is a probe.
        while await self._replay_one():
            pass
        task = self._rollup_task
        if task is not None and not task.done():
            await asyncio.wait({task})
        if self._rollup.ranges:
            await self._rollup.refresh(self._link)
