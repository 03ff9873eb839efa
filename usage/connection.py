"""The writer's PostgreSQL link: one pool connection, held while healthy, replaced after errors.

Also runs the periodic maintenance (``llm_gateway_maintain_usage()`` when the schema has it)
on a second pool connection, so writes never wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg

from . import writer as w
from .pricing import PriceBook
from .record import UsageRecord

if TYPE_CHECKING:
    from .writer import PoolConn

log = logging.getLogger("usage")

_MAINT_TIMEOUT = 120.0
_MAINTAIN_SQL = (
    "SELECT p.prokind FROM pg_proc p WHERE p.oid = to_regproc('llm_gateway_maintain_usage')"
)

_REFRESH_SQL = "SELECT to_regproc('llm_gateway_refresh_usage_hourly')"


def _alive(conn: PoolConn) -> bool:
    """Open and still ours: a proxy the pool took back after a connection loss is not."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:  # "connection has been released back to the pool"
        return False


class WriterLink:
    """The pool (owned or borrowed) and the writer's connection on it.

    On a borrowed pool, what the writer sets on its connection (the jsonb codec, the staging
    table) is undone before the connection goes back.
    """

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record] | None,
        *,
        connect_timeout: float,
        write_timeout: float,
    ) -> None:
        self.pool = pool
        self.owns_pool = pool is None
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self._conn: PoolConn | None = None
        self._copy_refused = False

    async def connection(self) -> PoolConn:
        """The writer's connection, acquired (and prepared) if there is none or it died."""
        conn = self._conn
        if conn is not None and _alive(conn):
            return conn
        self.discard()
        assert self.pool is not None, "start() creates the pool"
        conn = await self.pool.acquire(timeout=self.connect_timeout)
        self._conn = conn
        try:
            await w.set_codecs(conn)
        except BaseException:
            self.discard()
            raise
        return conn

    def discard(self) -> None:
        """Forget the connection and close it (its state is unknown). Never raises.

        Terminating the connection gives its slot back to the pool, which opens a new
        connection at the next acquire. After a connection loss asyncpg has already released
        the slot and detached our proxy, on which every call raises ``InterfaceError``: that
        is why nothing here may call the proxy unguarded.
        """
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()

    async def release(self) -> None:
        """Give a healthy connection back, undoing what the writer set on it."""
        conn = self._conn
        if conn is None or self.pool is None or not _alive(conn):
            self.discard()  # a closed connection still holds its pool slot until terminated
            return
        self._conn = None
        try:
            if not self.owns_pool:
                await w.drop_stage(conn)
                await w.reset_codecs(conn)
            await self.pool.release(conn, timeout=1.0)
        except Exception:
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()

    async def write(self, rows: list[UsageRecord], *, idempotent: bool) -> int:
        """One write of ``rows`` (see :mod:`usage.writer`); returns how many were new.

        Whatever fails, the link is left so that the next call reconnects if it must.
        """
        conn = await self.connection()
        try:
            if idempotent or self._copy_refused:
                return await w.upsert_rows(conn, rows, timeout=self.write_timeout)
            try:
                return await w.copy_rows(conn, rows, timeout=self.write_timeout)
            except asyncpg.FeatureNotSupportedError:
                # Row security (migration 007) makes PostgreSQL refuse COPY to a role that does
                # not own the table; INSERT is allowed: take the staged path from now on.
                self._copy_refused = True
                log.info("COPY into the usage table refused (not its owner); using INSERT")
                return await w.upsert_rows(conn, rows, timeout=self.write_timeout)
        except asyncio.CancelledError:
            self.discard()  # cancelled mid-statement: the session is unusable
            raise
        except Exception as exc:
            if w.classify_error(exc) == "transient":
                self.discard()
            raise

    async def maintain(self, prices: PriceBook) -> None:
        """Run ``llm_gateway_maintain_usage()`` if the schema has it, then reload prices.

        Errors are logged, never raised: maintenance is retried at the next interval.
        """
        assert self.pool is not None
        try:
            async with self.pool.acquire(timeout=self.connect_timeout) as conn:
                kind = await conn.fetchval(_MAINTAIN_SQL)
                if kind == "p":
                    await conn.execute("CALL llm_gateway_maintain_usage()", timeout=_MAINT_TIMEOUT)
                elif kind is not None:
                    result = await conn.fetchrow(
                        "SELECT * FROM llm_gateway_maintain_usage()", timeout=_MAINT_TIMEOUT
                    )
                    log.debug("usage maintenance: %s", dict(result) if result else None)
                await prices.refresh(conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("usage maintenance failed: %s", w.describe_error(exc))

    async def refresh_rollup(self, since: datetime, until: datetime) -> bool:
        """Recompute the hourly rollup over replayed rows' hours, if the schema has one.

        Maintenance only recomputes the last few hours; rows replayed from a spool after a long
        outage are older. Errors are logged, never raised: the raw rows are already written.
        Returns False on an error (the caller keeps the range and retries).
        """
        assert self.pool is not None
        try:
            async with self.pool.acquire(timeout=self.connect_timeout) as conn:
                if await conn.fetchval(_REFRESH_SQL) is None:
                    return True  # this schema has no rollup
                await conn.execute(
                    "SELECT llm_gateway_refresh_usage_hourly($1, $2)",
                    since,
                    until,
                    timeout=_MAINT_TIMEOUT,
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "rollup refresh after replay failed (kept for a retry): %s", w.describe_error(exc)
            )
            return False
        return True
