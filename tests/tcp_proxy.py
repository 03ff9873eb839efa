"""A loopback TCP proxy in front of PostgreSQL that a test can cut and restore.

Usage::

    async with TcpProxy(pg_dsn) as proxy:
        tracker = ModelUsageTracker(proxy.dsn, ...)
        ...
        await proxy.cut()      # every open connection is reset, new ones are reset at once
        ...
        proxy.restore()        # new connections reach PostgreSQL again (same port, same DSN)

While cut, the proxy keeps its listening socket (so the port cannot be taken by another
process and the DSN stays valid) but resets every connection it accepts before reading from
it: a client sees a refused/reset connection, as when the server is down.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to the host and port of ``dsn``.

    ``accepted`` counts connections forwarded to PostgreSQL, ``refused`` those reset while cut.
    """

    def __init__(self, dsn: str) -> None:
        self._parts = urlsplit(dsn)
        self._target = (self._parts.hostname or "127.0.0.1", self._parts.port or 5432)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cut = False
        self.port = 0
        self.accepted = 0
        self.refused = 0

    @property
    def dsn(self) -> str:
        """``dsn`` with its host and port replaced by the proxy's (credentials kept)."""
        user = self._parts.username or ""
        auth = user if self._parts.password is None else f"{user}:{self._parts.password}"
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(self._parts._replace(netloc=netloc))

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def open_connections(self) -> int:
        """Client connections currently forwarded."""
        return len(self._tasks)

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Reset every open connection and every new one until :meth:`restore`."""
        self._cut = True
        for transport in list(self._transports):
            transport.abort()
        # Let the pipes see their ends, so ``open_connections`` drops to 0.
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)

    def restore(self) -> None:
        """Forward new connections to PostgreSQL again."""
        self._cut = False

    async def close(self) -> None:
        """Stop listening and reset everything."""
        await self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        if self._cut:  # cut while we connected upstream
            up_writer.transport.abort()
            writer.transport.abort()
            return
        self.accepted += 1
        pair = {writer.transport, up_writer.transport}
        self._transports |= pair
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._transports -= pair
            self._tasks.discard(task)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until EOF or error, then reset the other side (a cut is abrupt both ways)."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    dst.transport.abort()
