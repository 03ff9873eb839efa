"""One supervised ``LISTEN`` connection per router: tenant config edits reach its cache at once.

Migration 006 makes every statement that inserts, deletes, or changes ``llm_tokens`` /
``inference_config`` of tenants send ``NOTIFY llm_gateway_tenant_config`` at COMMIT, with the
changed ids comma-separated (up to 200 per notice: a bulk edit of 10,000 tenants is 50
notices), or ``*`` for every tenant (TRUNCATE). :class:`ConfigListener` keeps one connection
listening and calls ``on_ids`` / ``on_reset``; when the connection is lost it reconnects with
backoff (at most ``max_backoff`` seconds between tries) and calls ``on_reset`` after each
(re)connect, since notices sent meanwhile were missed. While it is down, the cache TTL still
bounds how stale a config can be.

The gateway server's virtual keys use the same listener on their own channel
(``llm_gateway_virtual_keys``, a connection taken from the server's pool, ``+`` as a signal).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .dsn import connect_checked

__all__ = ["CHANNEL", "ConfigListener", "ListenerState", "parse_notice"]

CHANNEL = "llm_gateway_tenant_config"
ListenerState = Literal["starting", "listening", "reconnecting", "closed"]
log = logging.getLogger("llm_gateway")
# Tenant ids invalidated per event-loop iteration at most (plus one notice's 200): about 2 ms.
DRAIN_SLICE = 1000


def parse_notice(payload: str, channel: str = CHANNEL) -> list[uuid.UUID] | None:
    """The ids of a notice; ``None`` means every one (``*``).

    Malformed ids are skipped (logged): a notice sent by hand must not break the listener.
    """
    if payload.strip() == "*":
        return None
    ids: list[uuid.UUID] = []
    for part in payload.split(","):
        try:
            ids.append(uuid.UUID(part))
        except ValueError:
            log.warning("ignored a malformed id in a %s notice: %.60r", channel, part)
    return ids


class ConfigListener:
    """Keeps one connection listening on ``channel``, reconnecting when it is lost.

    ``on_ids(ids)`` runs in the event loop for each notice (one notice carries up to 200 ids:
    the trigger coalesces per statement); notices are queued as they arrive and handled in
    slices of about :data:`DRAIN_SLICE` ids per loop iteration, so a bulk edit does not stall
    the loop. ``on_reset()`` runs for ``*`` and after each successful (re)connect.
    ``signals``: payloads with a callback of their own (virtual keys: ``"+"``, a key was
    created). The connection is made with ``dsn``, or taken from ``pool`` (and given back,
    closed, when lost or at :meth:`close`). ``ping_interval``: seconds between liveness checks
    of an idle connection (a silently dead peer sends no reset). ``clock`` and ``sleep`` (the
    wait between tries) are for tests.
    """

    def __init__(
        self,
        dsn: str | None,
        on_ids: Callable[[Iterable[uuid.UUID]], None],
        on_reset: Callable[[], None],
        *,
        channel: str = CHANNEL,
        pool: asyncpg.Pool | None = None,
        signals: Mapping[str, Callable[[], None]] | None = None,
        name: str = "tenant config listener",
        connect_timeout: float = 5.0,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
        ping_interval: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if (dsn is None) == (pool is None):
            raise ValueError("ConfigListener needs exactly one of dsn and pool")
        self._dsn = dsn
        self._pool = pool
        self.channel = channel
        self.name = name
        self._signals = dict(signals or {})
        self._on_ids = on_ids
        self._on_reset = on_reset
        self._connect_timeout = connect_timeout
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._ping_interval = ping_interval
        self._clock = clock
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | PoolConnectionProxy | None = None
        self._lost: asyncio.Event | None = None
        self._first_attempt: asyncio.Event | None = None
        self._pending: collections.deque[str] = collections.deque()  # notices not yet handled
        self._draining = False
        self.state: ListenerState = "starting"
        self._since = clock()
        self.connects = 0  # successful LISTENs, the first included
        self.notices = 0
        self.ids = 0  # tenant ids received
        self.resets = 0  # times every cached config was dropped
        # CPU time (this thread's) spent handling notices, and the most one notice took:
        # wall time would count the moments the OS ran other processes.
        self.handler_seconds = 0.0
        self.handler_max = 0.0
        self.last_error: str | None = None  # type of the last connection error (no message)

    def start(self) -> None:
        """Start listening in a background task (idempotent)."""
        if self._task is None and self.state != "closed":
            self._first_attempt = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait_first_attempt(self, timeout: float) -> bool:
        """Until the first connect attempt ended (or ``timeout``); whether it is listening."""
        if self._first_attempt is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._first_attempt.wait()
        return self.state == "listening"

    async def close(self) -> None:
        """Stop listening and close the connection (idempotent)."""
        self._set_state("closed")
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._drop_connection()

    def status(self) -> dict[str, Any]:
        """The listener's state, for :meth:`TenantLLMRouter.status` (no DSN, no secrets)."""
        return {
            "state": self.state,
            "since_seconds": round(self._clock() - self._since, 3),
            "connects": self.connects,
            "notices": self.notices,
            "tenant_ids": self.ids,
            "resets": self.resets,
            "handler_ms": round(self.handler_seconds * 1000, 3),
            "handler_max_ms": round(self.handler_max * 1000, 3),
            "last_error": self.last_error,
        }

    # --- the supervised connection ------------------------------------------------------------

    def _set_state(self, state: ListenerState) -> None:
        if self.state != state and self.state != "closed":
            self.state = state
            self._since = self._clock()

    async def _run(self) -> None:
        backoff = self._min_backoff
        while True:
            try:
                await self._listen()  # returns only by raising: the connection was lost
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The type only: the message of a connect error may name the server.
                self.last_error = type(exc).__name__
                if self.state == "listening":
                    backoff = self._min_backoff  # it was up: start the backoff afresh
                if self.state != "reconnecting":
                    log.warning(
                        "%s: connection lost or refused (%s); retrying with backoff up to"
                        " %gs, cached entries expire by their TTL meanwhile",
                        self.name,
                        self.last_error,
                        self._max_backoff,
                    )
            await self._drop_connection()
            self._set_state("reconnecting")
            if self._first_attempt is not None:
                self._first_attempt.set()
            await self._sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _listen(self) -> None:
        """Connect, LISTEN, drop every cached config, then wait until the connection is lost."""
        lost = asyncio.Event()
        self._lost = lost
        conn: asyncpg.Connection | PoolConnectionProxy
        if self._pool is not None:
            conn = await self._pool.acquire(timeout=self._connect_timeout)
        else:
            assert self._dsn is not None
            conn = await connect_checked(
                self._dsn, self._connect_timeout, check=f"the router's dsn ({self.name})"
            )
        self._conn = conn
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(self.channel, self._on_notice)
        # Only now: a config loaded before LISTEN may predate an edit whose notice we missed.
        self.connects += 1
        self._reset()
        self._set_state("listening")
        self.last_error = None
        if self._first_attempt is not None:
            self._first_attempt.set()
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._ping_interval):
                    await lost.wait()
            if not lost.is_set():
                # A liveness check: a peer that vanished without a reset is found here.
                await conn.execute("SELECT 1", timeout=self._connect_timeout)
        raise ConnectionResetError("listening connection closed")

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # A pool detaches its proxy once the connection is lost: then both calls raise.
        with contextlib.suppress(asyncpg.InterfaceError):
            if not conn.is_closed():
                conn.terminate()  # no goodbye over a connection that may be half dead
        if isinstance(conn, PoolConnectionProxy) and self._pool is not None:
            with contextlib.suppress(Exception):  # the pool replaces the closed connection
                await self._pool.release(conn)

    # --- notices ------------------------------------------------------------------------------

    def _reset(self) -> None:
        self.resets += 1
        self._on_reset()

    def _on_notice(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        # Only queued here: asyncpg runs one callback per notice, all in one loop iteration, so
        # 10,000 one-id notices (10,000 UPDATE statements in one transaction) must not each
        # do the work. The queue is drained in slices, one slice per loop iteration.
        self.notices += 1
        self._pending.append(str(payload))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        """Handle queued notices, up to about :data:`DRAIN_SLICE` ids, then yield the loop."""
        started = time.thread_time()
        done = 0
        pending = self._pending
        try:
            while pending and done < DRAIN_SLICE:
                payload = pending.popleft()
                signal = self._signals.get(payload.strip())
                if signal is not None:
                    signal()
                    done += 1
                    continue
                ids = parse_notice(payload, self.channel)
                if ids is None:
                    self._reset()
                    done += 1
                else:
                    self.ids += len(ids)
                    self._on_ids(ids)
                    done += len(ids) or 1
        finally:  # a failing callback must not leave the queue undrained for good
            if pending:
                asyncio.get_running_loop().call_soon(self._drain)
            else:
                self._draining = False
        took = time.thread_time() - started
        self.handler_seconds += took
        self.handler_max = max(self.handler_max, took)
