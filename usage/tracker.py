"""ModelUsageTracker: records every usage row to PostgreSQL, losing none.

The caller's path is :meth:`ModelUsageTracker.record`: a ``deque.append`` and a length check, no
I/O, no task. One writer task, owned by the tracker, drains the queue in batches (see
:mod:`usage.writer` for the write paths). A batch leaves memory only once PostgreSQL confirmed
it or it is fsynced to the spool (:mod:`usage.spool`): a failed write is retried with backoff;
when PostgreSQL stays away longer than ``grace_period``, or the queue passes ``high_water``,
batches go to the spool, which is replayed on recovery and at the next start.

A service adds two lines to its shutdown so queued rows are written (or spooled)::

    tracker = await get_usage_tracker()   # or your own ModelUsageTracker, started
    ...
    await tracker.close(timeout=10)       # e.g. in a SIGTERM handler or lifespan shutdown

:mod:`usage.shared` holds the process-wide tracker (``get_usage_tracker``, ``track_usage``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from .analytics.labels import labels_from
from .ids import new_usage_id
from .pipeline import UsagePipeline
from .pricing import PriceBook, default_price_book
from .queries import UsageQueries
from .record import UsageRecord
from .spool import Spool, default_spool_dir
from .stats import UsageBacklog
from .writer import describe_error, set_codecs

__all__ = ["DEFAULT_DSN", "ModelUsageTracker", "resolve_dsn"]

log = logging.getLogger("usage")

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
APPLICATION_NAME = "llm_gateway.usage"
_MAX_ERROR_MESSAGE = 4000

# Started trackers, strongly held until closed: a forgotten tracker is not garbage-collected
# with rows in memory, and the exit hook below can still spool them.
_RUNNING: set[ModelUsageTracker] = set()


@atexit.register
def _spool_at_exit() -> None:
    for tracker in list(_RUNNING):
        tracker._spool_memory_sync("interpreter exit")


class ModelUsageTracker(UsageQueries, UsagePipeline):
    """Batched, lossless usage recording into ``model_usage_stats``.

    Args:
        dsn: PostgreSQL to write to; the tracker then owns a small pool (``pool_max_size``
            connections, created lazily: one for the writer, the others for maintenance and
            the stats queries). Default ``$DATABASE_URL``, else the local server.
        pool: a pool of the application's instead of ``dsn``; the writer holds one of its
            connections while running and gives it back as it found it.
        batch_size: most rows per write; a queue this long also wakes the writer at once.
        flush_interval: seconds a row waits at most before a write is started.
        high_water: queued rows beyond which batches go to the spool, not to PostgreSQL.
        max_queued: hard cap on rows in memory (default ``4 * high_water``): while PostgreSQL
            hangs and the spool cannot be written, rows recorded beyond it are dropped,
            counted in ``backlog().dropped_rows`` and logged, so memory stays bounded.
        spool_dir: the local spool (default ``$LLM_GATEWAY_SPOOL_DIR`` or
            ``~/.cache/llm-gateway/spool``).
        grace_period: seconds of failed writes after which batches go to the spool.
        price_book: prices for :meth:`track_request`; refreshed from ``model_prices`` at start
            and at each maintenance. Default: the process-wide book.
        maintenance_interval: seconds between calls of ``llm_gateway_maintain_usage()``.
        connect_timeout / write_timeout: limits of one connection attempt / one write.
        max_backoff: longest wait between retries, and between probes during an outage.

    ``record()`` must be called from the event loop's thread. Rows recorded before
    :meth:`start` wait in memory.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: asyncpg.Pool[asyncpg.Record] | None = None,
        batch_size: int = 5000,
        flush_interval: float = 0.2,
        high_water: int = 100_000,
        max_queued: int | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        grace_period: float = 5.0,
        price_book: PriceBook | None = None,
        maintenance_interval: float = 300.0,
        connect_timeout: float = 5.0,
        write_timeout: float = 30.0,
        max_backoff: float = 2.0,
        pool_max_size: int = 4,
    ) -> None:
        if dsn is not None and pool is not None:
            raise ValueError("give dsn or pool, not both")
        if batch_size < 1 or high_water < batch_size:
            raise ValueError("need 1 <= batch_size <= high_water")
        cap = 4 * high_water if max_queued is None else max_queued
        if cap < high_water:
            raise ValueError("need high_water <= max_queued")
        self._dsn = dsn if dsn is not None or pool is not None else _env_dsn()
        self._pool_max_size = max(2, pool_max_size)
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self._warned_after_close = False
        super().__init__(
            pool=pool,
            batch_size=batch_size,
            flush_interval=flush_interval,
            high_water=high_water,
            max_queued=cap,
            spool_dir=Path(spool_dir) if spool_dir is not None else default_spool_dir(),
            grace_period=grace_period,
            maintenance_interval=maintenance_interval,
            connect_timeout=connect_timeout,
            write_timeout=write_timeout,
            max_backoff=max_backoff,
            price_book=price_book if price_book is not None else default_price_book(),
        )

    # --- the caller's path -------------------------------------------------------------

    def record(self, rec: UsageRecord) -> None:
        """Queue one row. Synchronous, no I/O, a few µs; never fails for database reasons.

        At the hard cap (``max_queued`` rows in memory) the row is dropped and counted.
        """
        queue = self._queue
        if len(queue) + len(self._inflight) >= self._max_queued:
            self._dropped += 1
            self._drop_episode += 1
            if self._drop_episode == 1:  # once per episode: the writer logs its end
                log.error(
                    "usage queue full (%d rows in memory, PostgreSQL and the spool are not"
                    " taking them): dropping usage rows",
                    self._max_queued,
                )
            return
        queue.append(rec)
        if len(queue) >= self._batch_size:
            self._wake.set()
        if self._closed and not self._warned_after_close:
            self._warned_after_close = True
            _RUNNING.add(self)  # so the exit hook spools it
            log.warning("usage row recorded after close(): it is spooled at interpreter exit")

    def make_record(
        self,
        *,
        tenant_id: uuid.UUID | str,
        provider: str,
        model_name: str,
        endpoint: str,
        latency_ms: float,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        status: str = "success",
        error_message: str | None = None,
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        cached_input_tokens: int | None = None,
        reasoning_tokens: int | None = None,
        request_id: uuid.UUID | None = None,
        requested_model: str | None = None,
        attempt: int = 1,
        key_source: str | None = None,
        timestamp: datetime | None = None,
        usage_id: uuid.UUID | None = None,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        virtual_key_id: str | None = None,
    ) -> UsageRecord:
        """Build a row with a new id and its cost from the price book (no I/O).

        ``session_id`` and ``tags`` default to the same keys of ``metadata``; an invalid one
        raises :class:`~usage.analytics.labels.InvalidLabelError` (a ``ValueError``).
        """
        session, tag_list = labels_from(session_id, tags, metadata)
        ts = timestamp if timestamp is not None else datetime.now(UTC)
        day = ts.date() if ts.tzinfo is UTC or ts.tzinfo is None else ts.astimezone(UTC).date()
        price = self._prices.lookup(provider, model_name, day, requested_model)
        meta = dict(metadata) if metadata else None
        if price is not None and price.match != "exact":
            # Say which table entry priced a served name the table does not list.
            meta = meta or {}
            meta["price_model"] = price.model
            meta["price_match"] = price.match
        if cached_input_tokens is not None or reasoning_tokens is not None:
            meta = meta or {}
            if cached_input_tokens is not None:
                meta["cached_input_tokens"] = cached_input_tokens
            if reasoning_tokens is not None:
                meta["reasoning_tokens"] = reasoning_tokens
        return UsageRecord(
            id=usage_id if usage_id is not None else new_usage_id(),
            tenant_id=tenant_id if isinstance(tenant_id, uuid.UUID) else uuid.UUID(tenant_id),
            user_id=None if user_id is None else str(user_id),
            provider=provider,
            model_name=model_name,
            endpoint=endpoint,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            latency_ms=round(latency_ms),
            estimated_cost_usd=None
            if price is None
            else price.cost(
                input_tokens,
                output_tokens,
                cached_input_tokens=cached_input_tokens,
                reasoning_tokens=reasoning_tokens,
            ),
            status=status,
            error_message=None if error_message is None else error_message[:_MAX_ERROR_MESSAGE],
            metadata=meta,
            timestamp=ts,
            request_id=request_id,
            requested_model=requested_model,
            attempt=attempt,
            key_source=key_source,
            input_price_per_m=None if price is None else price.input_per_m,
            output_price_per_m=None if price is None else price.output_per_m,
            price_known=price is not None,
            session_id=session,
            tags=tag_list,
            virtual_key_id=virtual_key_id,
        )

    async def track_request(
        self,
        *,
        tenant_id: uuid.UUID | str,
        provider: str,
        model_name: str,
        endpoint: str,
        latency_ms: float,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        status: str = "success",
        error_message: str | None = None,
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        cached_input_tokens: int | None = None,
        reasoning_tokens: int | None = None,
        request_id: uuid.UUID | None = None,
        requested_model: str | None = None,
        attempt: int = 1,
        key_source: str | None = None,
        timestamp: datetime | None = None,
        usage_id: uuid.UUID | None = None,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
    ) -> uuid.UUID:
        """Queue one row, priced by the tracker's price book; returns its id at once.

        Fire-and-forget: it never waits for PostgreSQL (see :meth:`make_record`).
        """
        rec = self.make_record(
            tenant_id=tenant_id,
            provider=provider,
            model_name=model_name,
            endpoint=endpoint,
            latency_ms=latency_ms,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            status=status,
            error_message=error_message,
            user_id=user_id,
            metadata=metadata,
            cached_input_tokens=cached_input_tokens,
            reasoning_tokens=reasoning_tokens,
            request_id=request_id,
            requested_model=requested_model,
            attempt=attempt,
            key_source=key_source,
            timestamp=timestamp,
            usage_id=usage_id,
            session_id=session_id,
            tags=tags,
        )
        self.record(rec)
        return rec.id

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the pool, run maintenance, start the writer. Idempotent.

        The spool is replayed by the writer in the background, between live batches: start()
        (and so a process's first request) does not wait for it.

        An unreachable database is not an error: rows are then spooled after the grace period
        and replayed once it is back. A spool directory that cannot be created raises
        ``OSError`` (a deployment error, better found at start than during an outage).
        """
        if self._writer is not None:
            return
        if self._closed:
            raise RuntimeError("this tracker was closed; make a new one")
        self._spool = Spool(self._spool_dir)
        await asyncio.to_thread(self._spool.files)
        await asyncio.to_thread(self._spool.remove_stale_tmp)
        if self._link.pool is None:
            # min_size=0: creating the pool never fails because PostgreSQL is down.
            self._link.pool = await asyncpg.create_pool(
                self._dsn,
                min_size=0,
                max_size=self._pool_max_size,
                timeout=self._link.connect_timeout,
                server_settings={"application_name": APPLICATION_NAME},
                init=set_codecs,
            )
        try:
            await self._link.connection()
        except Exception as exc:
            self._note_failure(exc, "PostgreSQL unreachable at start")
        else:
            try:
                await self._prices.refresh(await self._link.connection())
            except Exception as exc:  # shipped prices still apply
                log.warning("could not load model_prices: %s", describe_error(exc))
            self._start_maintenance()
        self._replay_due = self._spool.pending_files > 0
        _RUNNING.add(self)
        self._writer = asyncio.get_running_loop().create_task(
            self._run(), name="llm-gateway-usage-writer"
        )

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row queued so far is in PostgreSQL or the spool.

        Returns ``False`` if ``timeout`` passed first. Spool files are not replayed by this.
        """
        target = self._settled + len(self._inflight) + len(self._queue)
        if self._settled >= target:
            return True
        if self._writer is None or self._writer.done():
            raise RuntimeError("the tracker is not running: call start()")
        waiter = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((target, waiter))
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(waiter)
        except TimeoutError:
            return False
        finally:
            self._flush_waiters = [(t, f) for t, f in self._flush_waiters if f is not waiter]
        return True

    async def close(self, timeout: float = 10.0) -> UsageBacklog:
        """Drain to PostgreSQL until ``timeout``, spool the rest, release the pool. Idempotent.

        With PostgreSQL up, the spool (what this process spooled during an outage, and older
        files) is replayed too, within the same deadline; what is left waits for the next start.
        """
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
            try:
                await self._close(timeout)
            finally:
                self._closing.set_result(None)
        else:
            await asyncio.shield(self._closing)
        return self.backlog()

    async def _close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._maintenance is not None:
            self._maintenance.cancel()
        writer = self._writer
        if writer is not None and not writer.done():
            await asyncio.wait({writer}, timeout=max(0.0, deadline - time.monotonic()))
            if not writer.done():
                log.warning(
                    "close(): deadline reached, spooling %d rows; unreplayed spool files wait"
                    " for the next start",
                    self._in_memory(),
                )
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
        if self._rollup_task is not None:
            self._rollup_task.cancel()
        for since, until in self._rollup.ranges:  # this process can no longer retry them
            log.warning(
                "hourly rollup not refreshed for replayed rows from %s to %s: run"
                " SELECT llm_gateway_refresh_usage_hourly(from, to) for that range",
                since.isoformat(),
                until.isoformat(),
            )
        if self._queue:
            self._inflight += self._queue
            self._queue.clear()
        if self._inflight:
            await self._spool_inflight(wait_on_error=False)
        await self._link.release()
        pool = self._link.pool
        if self._link.owns_pool and pool is not None:
            try:
                await asyncio.wait_for(pool.close(), max(1.0, deadline - time.monotonic()))
            except (TimeoutError, OSError, asyncpg.PostgresError):
                pool.terminate()
        _RUNNING.discard(self)
        self._notify_flush()

    # --- read side (the stats and analytics queries: usage.queries) --------------------

    @property
    def stats(self) -> UsageBacklog:
        """Same as :meth:`backlog`."""
        return self.backlog()


def resolve_dsn(dsn: str | None = None) -> str:
    """``dsn``, else ``$DATABASE_URL``, else :data:`DEFAULT_DSN`: the one resolution."""
    return dsn or os.environ.get("DATABASE_URL") or DEFAULT_DSN


def _env_dsn() -> str:
    return resolve_dsn()
