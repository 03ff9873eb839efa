"""This process's leases, kept renewed through PostgreSQL: one statement renews every lease
that needs it, shared by the requests waiting on it; a background loop renews busy leases and
gives idle ones back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from .ledger import Lease
from .limits import LimitSpec

__all__ = ["LeaseBook", "LeaseClient"]

log = logging.getLogger("llm_gateway.governance")

_RENEW = "SELECT llm_gateway_quota_renew($1, $2, $3::jsonb)::text"
_RELEASE = "SELECT llm_gateway_quota_release($1)"
IDLE_AFTER = 3.0  # seconds without a request before a lease is given back
# Shorter gaps between renewals count as this long when estimating a lease's demand.
MIN_ELAPSED = 0.05
DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class LeaseClient:
    """Renews and releases the leases of one process (``holder``) on a shared pool.

    ``statements`` counts the statements sent, for the benchmark's per-1,000-requests figure.
    """

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        *,
        holder: uuid.UUID | None = None,
        lease_ttl: float = 10.0,
        timeout: float = 5.0,
    ) -> None:
        self._pool = pool
        self.holder = holder or uuid.uuid4()
        self.lease_ttl = lease_ttl
        self.timeout = timeout
        self.statements = 0

    async def renew(self, requests: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Answers by lease key. Raises asyncpg/OS errors and ``TimeoutError``."""
        self.statements += 1
        raw = await self._pool().fetchval(
            _RENEW,
            self.holder,
            self.lease_ttl,
            orjson.dumps(list(requests)).decode(),
            timeout=self.timeout,
        )
        return {a["key"]: a for a in orjson.loads(raw)}

    async def release(self) -> None:
        """Give back every lease of this process (at shutdown)."""
        self.statements += 1
        await self._pool().fetchval(_RELEASE, self.holder, timeout=self.timeout)


class LeaseBook:
    """Every lease of this process by limit key, and the one renewal in flight.

    ``on_renewed(lease)`` is called for each lease a renewal answered (budget alerts).
    """

    def __init__(
        self,
        client: LeaseClient,
        *,
        renew_interval: float,
        retry_db_after: float,
        clock: Callable[[], float],
        wall: Callable[[], float],
        on_renewed: Callable[[Lease], None] | None = None,
    ) -> None:
        self.client = client
        self.renew_interval = renew_interval
        self.retry_db_after = retry_db_after
        self.clock = clock
        self.wall = wall
        self.on_renewed = on_renewed
        self.leases: dict[str, Lease] = {}
        self.db_down_until = 0.0
        self._renewing: asyncio.Task[None] | None = None
        self._started = 0  # renewals started; each takes the needs noted before it started
        self._ended = 0
        self._wanted: dict[str, float] = {}  # lease key -> amount needed now
        self._loop: asyncio.Task[None] | None = None

    def lease(self, spec: LimitSpec, epoch: float) -> Lease:
        """The current lease of a spec (a budget's lease of the period holding ``epoch``)."""
        lease = self.leases.get(spec.key)
        if lease is None or epoch >= lease.ends_at:
            lease = self.leases[spec.key] = Lease.of(spec, epoch)
        return lease

    async def renew(self, needs: dict[str, float]) -> None:
        """Renew the leases in ``needs`` (key -> amount a request needs), sharing renewals.

        Needs of concurrent requests add up, so one renewal can admit them all.
        """
        for key, amount in needs.items():
            self._wanted[key] = self._wanted.get(key, 0.0) + amount
        # The next renewal to start takes these needs; wait until it has ended. (A renewal in
        # flight started without them; and returning when a *later* one took them, before it
        # answered, would refuse a request that its answer admits.)
        ticket = self._started + 1
        while self._ended < ticket:
            running = self._renewing
            if running is None or running.done():  # done: its callback has not run yet
                running = self._start()
            await asyncio.shield(running)
            if all(self.leases[k].free >= a for k, a in needs.items() if k in self.leases):
                return

    def _start(self, release: Iterable[str] = ()) -> asyncio.Task[None]:
        """The one renewal in flight (requests and the background loop share it)."""
        running = asyncio.get_running_loop().create_task(self._renew_now(release))
        self._renewing = running
        running.add_done_callback(self._renewed)
        return running

    def _renewed(self, task: asyncio.Task[None]) -> None:
        if self._renewing is task:
            self._renewing = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("quota lease renewal failed: %r", task.exception())

    async def _renew_now(self, release: Iterable[str] = ()) -> None:
        self._started += 1
        try:
            await self._renew_wanted(release)
        finally:
            self._ended += 1

    async def _renew_wanted(self, release: Iterable[str]) -> None:
        wanted, self._wanted = self._wanted, {}
        at = datetime.fromtimestamp(self.wall(), UTC)
        now = self.clock()
        snapshots: dict[str, tuple[Lease, Any]] = {}
        requests = []
        released = set(release)
        for key, lease in list(self.leases.items()):
            busy = (
                now - lease.renewed_at >= self.renew_interval
                and now - lease.last_used < IDLE_AFTER + self.renew_interval
            )
            if not (key in wanted or busy or key in released):
                continue
            elapsed = now - lease.renewed_at
            if elapsed < math.inf:
                # Demand per renew interval, from what was taken since the last renewal: a
                # lease that runs dry after a few milliseconds is sized for the real rate.
                taken = lease.unreported if lease.rate else lease.taken
                rate = taken / max(elapsed, MIN_ELAPSED)
                lease.demand = 0.5 * lease.demand + 0.5 * rate * self.renew_interval
            lease.taken = 0.0
            request, snapshot = lease.renewal(wanted.get(key, 0.0), at)
            if key in released:
                request["want"] = 0 if lease.rate else lease.held - lease.free
            requests.append(request)
            snapshots[request["key"]] = (lease, snapshot)
            lease.renewed_at = now
        if not requests or now < self.db_down_until:
            return
        try:
            answers = await self.client.renew(requests)
        except DB_ERRORS as exc:
            self.db_down_until = self.clock() + self.retry_db_after
            log.warning(
                "quota lease renewal failed (%s); enforcing from what this process holds",
                type(exc).__name__,
            )
            return
        done = self.clock()
        for key, (lease, snapshot) in snapshots.items():
            answer = answers.get(key)
            if answer is not None:
                lease.apply(answer, snapshot, done)
                if self.on_renewed is not None:
                    self.on_renewed(lease)

    async def give_back(self, keys: Sequence[str]) -> None:
        """Give back the room of ``keys`` that nothing in flight or pending holds (after the
        renewal in flight: one renewal at a time keeps each lease's answers in order)."""
        while self._renewing is not None and not self._renewing.done():
            await asyncio.shield(self._renewing)
        await asyncio.shield(self._start(release=keys))
        for key in keys:
            lease = self.leases.get(key)
            if lease is not None:
                lease.short_free = lease.free

    # --- background ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(
                self._run(), name="llm-gateway-quota-leases"
            )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.renew_interval / 2)
            now = self.clock()
            idle = [
                k
                for k, lease in self.leases.items()
                if now - lease.last_used >= IDLE_AFTER and (lease.held > 0 or lease.unreported)
            ]
            if self._renewing is None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._start(release=idle))

    async def close(self) -> None:
        """Stop renewing and give every lease back (best effort)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        with contextlib.suppress(Exception):
            await self._renew_now(release=list(self.leases))
            await self.client.release()
