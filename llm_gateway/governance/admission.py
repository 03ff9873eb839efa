"""Admission: may this request run, on which chain entries, and what does it hold meanwhile.

The cached path is in memory: each limit's lease (:mod:`.ledger`) has room, the request takes
its share and runs. A lease without room is renewed first (one statement for every lease that
needs it, shared by concurrent requests); only then is a request refused. A background task
renews busy leases each ``renew_interval`` and gives idle ones back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import asyncpg

from .alerts import AlertSink
from .config import Governance
from .errors import BudgetExceededError, QuotaExceededError
from .leases import LeaseClient
from .ledger import Lease, Take
from .limits import LimitSpec

__all__ = ["Admission", "Governor", "QuotaPlan"]

log = logging.getLogger("llm_gateway.governance")

OnDbError = Literal["open", "closed"]
IDLE_AFTER = 3.0  # seconds without a request before a lease is given back
# After a renewal that could not grant what was asked, requests short of that lease are refused
# without asking again for this long: refusals do not cost a statement each.
SHORT_BACKOFF = 0.02
# Shorter gaps between renewals count as this long when estimating a lease's demand.
MIN_ELAPSED = 0.05
RENEW_ROUNDS = 16  # renewals one request may wait on before it is refused


class Entry(Protocol):
    """What admission reads of a chain entry (``chain.ChainEntry`` has it)."""

    @property
    def provider(self) -> str: ...
    @property
    def key_source(self) -> str: ...
    @property
    def price_per_m(self) -> tuple[float, float] | None: ...


@dataclass(frozen=True, slots=True)
class QuotaPlan:
    """The specs of one tenant (built once per config load) and its budget options."""

    whole: tuple[LimitSpec, ...] = ()
    system: tuple[LimitSpec, ...] = ()
    providers: dict[str, tuple[LimitSpec, ...]] = field(default_factory=dict)
    allow_unpriced: bool = False
    on_exhausted: Literal["refuse", "cheapest"] = "refuse"
    governance: Governance | None = None  # the merged sections (user_limits are per user)

    @property
    def empty(self) -> bool:
        return not (self.whole or self.system or self.providers)

    @property
    def budgeted(self) -> bool:
        return any(s.kind == "budget" for s in self.whole)


@dataclass(slots=True)
class Admission:
    """An admitted request: the entries it may use and what it took from each lease."""

    entries: list[Any]
    takes: list[Take]
    charges: list[Lease]  # budget leases an attempt's cost counts against (tenant, user)
    system_charges: list[Lease]  # ... and those of system-key attempts
    excluded: dict[str, str]  # provider -> why a quota removed it from the chain
    settled: bool = False


def _entry_cost(entry: Entry, tokens_in: int, tokens_out: int) -> float | None:
    price = entry.price_per_m
    if price is None:
        return None
    return (tokens_in * price[0] + tokens_out * price[1]) / 1e6


class Governor:
    """Budgets and rate limits of every tenant, shared with other processes through leases."""

    def __init__(
        self,
        client: LeaseClient,
        *,
        renew_interval: float = 1.0,
        on_db_error: OnDbError = "open",
        retry_db_after: float = 1.0,
        alerts: AlertSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if on_db_error not in ("open", "closed"):
            raise ValueError(f"quota_on_db_error must be 'open' or 'closed', not {on_db_error!r}")
        self.client = client
        self.alerts = alerts
        self.renew_interval = renew_interval
        self.on_db_error = on_db_error
        self.retry_db_after = retry_db_after
        self.clock = clock
        self.wall = wall
        self._leases: dict[str, Lease] = {}
        self._renewing: asyncio.Task[None] | None = None
        self._renewals_started = 0  # each takes the needs noted before it started
        self._renewals_ended = 0
        self._wanted: dict[str, float] = {}  # lease key -> amount needed now
        self._db_down_until = 0.0
        self._pending: dict[uuid.UUID, list[tuple[Lease, float]]] = {}
        self._loop: asyncio.Task[None] | None = None
        self.refusals = 0
        self.opened = 0  # admitted without a lease while PostgreSQL failed

    # --- leases ----------------------------------------------------------------------------

    def lease(self, spec: LimitSpec, now: datetime) -> Lease:
        """The current lease of a spec (a budget's lease of the current period)."""
        lease = self._leases.get(spec.key)
        if lease is None or (lease.bounds is not None and now >= lease.bounds.end):
            lease = Lease(spec, bounds=spec.bounds(now) if spec.kind == "budget" else None)
            self._leases[spec.key] = lease
        return lease

    async def _renew(self, needs: dict[str, float]) -> None:
        """Renew the leases in ``needs`` (key -> amount this request needs), sharing renewals.

        Needs of concurrent requests add up, so one renewal can admit them all.
        """
        for key, amount in needs.items():
            self._wanted[key] = self._wanted.get(key, 0.0) + amount
        # The next renewal to start takes these needs; wait until it has ended. (A renewal in
        # flight started without them; and returning when a *later* one took them, before it
        # answered, would refuse a request that its answer admits.)
        ticket = self._renewals_started + 1
        while self._renewals_ended < ticket:
            running = self._renewing
            if running is None or running.done():  # done: its callback has not run yet
                running = self._start_renewal()
            await asyncio.shield(running)
            if all(self._leases[k].room() >= a for k, a in needs.items() if k in self._leases):
                return

    def _start_renewal(self, release: Iterable[str] = ()) -> asyncio.Task[None]:
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
        self._renewals_started += 1
        try:
            await self._renew_wanted(release)
        finally:
            self._renewals_ended += 1

    async def _renew_wanted(self, release: Iterable[str]) -> None:
        wanted, self._wanted = self._wanted, {}
        at = datetime.fromtimestamp(self.wall(), UTC)
        now = self.clock()
        snapshots: dict[str, tuple[Lease, Any]] = {}
        requests = []
        released = set(release)
        for key, lease in list(self._leases.items()):
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
                rate = lease.taken / max(elapsed, MIN_ELAPSED)
                lease.demand = 0.5 * lease.demand + 0.5 * rate * self.renew_interval
            lease.taken = 0.0
            request, snapshot = lease.renewal(wanted.get(key, 0.0), at)
            if key in released:
                request["want"] = (
                    lease.reserved + lease.pending if lease.spec.kind == "budget" else 0
                )
            requests.append(request)
            snapshots[request["key"]] = (lease, snapshot)
            lease.renewed_at = now
        if not requests or now < self._db_down_until:
            return
        try:
            answers = await self.client.renew(requests)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._db_down_until = self.clock() + self.retry_db_after
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
                if lease.spec.alert_at:
                    self._check_alerts(lease, lease.committed)

    async def refresh(self, leases: Iterable[Lease]) -> None:
        """Renew ``leases`` now (for reporting): what they hold is asked for again."""
        await self._renew({lease.spec.key: 0.0 for lease in leases})

    def steering(
        self, plan: QuotaPlan, entries: Sequence[Entry], tokens_in: int, tokens_out: int
    ) -> dict[str, str]:
        """Providers a quota would remove from ``entries`` now, with why (for ``explain``;
        from what this process holds, no I/O, nothing taken)."""
        at = datetime.fromtimestamp(self.wall(), UTC)
        tokens = float(tokens_in + tokens_out)
        excluded: dict[str, str] = {}
        for provider, specs in plan.providers.items():
            if any(e.provider == provider for e in entries):
                short = self._short(specs, tokens, at, {})
                if short is not None:
                    excluded[provider] = f"provider quota: {short.limit} reached"
        system_entries = [e for e in entries if e.key_source == "system"]
        if plan.system and system_entries:
            worst = self._worst(system_entries, tokens_in, tokens_out)
            short = self._short(plan.system, tokens, at, {}, worst)
            if short is not None:
                for e in system_entries:
                    excluded.setdefault(e.provider, f"system key quota: {short.limit} reached")
        return excluded

    def rate_resets_at(self, lease: Lease, at: datetime) -> datetime:
        """When the oldest use in a rate window leaves it (``at`` if none is known)."""
        spec = lease.spec
        if lease.oldest is None:
            return at
        return datetime.fromtimestamp(lease.oldest + spec.window_s + spec.bucket_s, UTC)

    # --- admission ---------------------------------------------------------------------------

    async def admit(
        self,
        plan: QuotaPlan,
        user_specs: Sequence[LimitSpec],
        entries: Sequence[Entry],
        tokens_in: int,
        tokens_out: int,
    ) -> Admission:
        """Admit a request or raise :class:`QuotaExceededError` (no provider is contacted).

        ``entries`` is the planned chain; the admission's ``entries`` are those still allowed
        (provider quotas and the system-key quota remove entries; a spent budget leaves only
        free models, or the cheapest that fit with ``on_exhausted: "cheapest"``).
        """
        for _ in range(RENEW_ROUNDS):
            result = self._try_admit(plan, user_specs, entries, tokens_in, tokens_out, final=False)
            if isinstance(result, Admission):
                return result
            now = self.clock()
            # Again after a renewal: while this request waited, others may have taken the room
            # of a lease that had enough before (a few rounds, then it is refused).
            needs = {
                k: a
                for k, a in result[1].items()
                if now - self._leases[k].short_at >= SHORT_BACKOFF
            }
            if not needs or now < self._db_down_until:
                break
            await self._renew(needs)
        db_down = self.clock() < self._db_down_until
        result = self._try_admit(plan, user_specs, entries, tokens_in, tokens_out, final=True)
        if isinstance(result, Admission):
            return result
        if db_down and self.on_db_error == "open":
            # PostgreSQL is failing and this process's share is spent: serve (counted, logged).
            self.opened += 1
            return Admission(list(entries), [], [], [], {})
        raise self._refusal(result[0], result[2])

    def _try_admit(
        self,
        plan: QuotaPlan,
        user_specs: Sequence[LimitSpec],
        entries: Sequence[Entry],
        tokens_in: int,
        tokens_out: int,
        *,
        final: bool,
    ) -> Admission | tuple[LimitSpec, dict[str, float], str]:
        """An admission, or the limit that refuses (with what renewing would need).

        Before a renewal (``final=False``) any shortage is only reported; after it, quotas
        that steer remove entries and a spent budget falls back to free or cheapest models.
        """
        at = datetime.fromtimestamp(self.wall(), UTC)
        tokens = float(tokens_in + tokens_out)
        allowed = list(entries)
        needs: dict[str, float] = {}
        excluded: dict[str, str] = {}
        steer: tuple[LimitSpec, str] | None = None
        first: LimitSpec | None = None  # the first limit short of room
        for provider, specs in plan.providers.items():
            if not any(e.provider == provider for e in allowed):
                continue
            short = self._short(specs, tokens, at, needs)
            first = first or short
            if short is not None and final:
                allowed = [e for e in allowed if e.provider != provider]
                excluded[provider] = f"provider quota: {short.limit} reached"
                steer = steer or (short, excluded[provider])
        system_entries = [e for e in allowed if e.key_source == "system"]
        if plan.system and system_entries:
            worst = self._worst(system_entries, tokens_in, tokens_out)
            short = self._short(plan.system, tokens, at, needs, worst)
            first = first or short
            if short is not None and final:
                allowed = [e for e in allowed if e.key_source != "system"]
                reason = f"system key quota: {short.limit} reached"
                for e in system_entries:
                    excluded.setdefault(e.provider, reason)
                steer = (short, reason)
        whole = (*plan.whole, *user_specs)
        budgets = [s for s in whole if s.kind == "budget"]
        if budgets and not plan.allow_unpriced:
            priced = [e for e in allowed if e.price_per_m is not None]
            if not priced and allowed:
                return budgets[0], needs, "no model with a known price (see budget.allow_unpriced)"
            allowed = priced
        cost = self._worst(allowed, tokens_in, tokens_out)
        short = self._short(whole, tokens, at, needs, cost)
        first = first or short
        if first is not None and not final:
            return first, needs, ""
        if short is not None and short.kind == "budget":
            allowed, cost = self._within_budget(plan, whole, allowed, tokens_in, tokens_out, at)
            short = self._short(whole, tokens, at, {}, cost) if allowed else short
        if short is not None:
            return short, needs, ""
        if not allowed:
            if steer is None:
                raise ValueError("admission needs at least one chain entry")
            return steer[0], needs, steer[1]
        return self._take(plan, whole, allowed, tokens, tokens_in, tokens_out, cost, at, excluded)

    def _take(
        self,
        plan: QuotaPlan,
        whole: Sequence[LimitSpec],
        allowed: list[Any],
        tokens: float,
        tokens_in: int,
        tokens_out: int,
        cost: float,
        at: datetime,
        excluded: dict[str, str],
    ) -> Admission:
        """Everything fits: take the request's share from every lease.

        The hot path of every admitted request: one pass over the limits, no intermediate lists.
        """
        epoch = self.wall()
        now = self.clock()
        leases = self._leases
        system_entries = [e for e in allowed if e.key_source == "system"]
        takes: list[Take] = []
        charges: list[Lease] = []
        system_charges: list[Lease] = []
        groups: list[tuple[Sequence[LimitSpec], float, list[Lease] | None]] = [
            (whole, cost, charges)
        ]
        if system_entries:
            system_cost = self._worst(system_entries, tokens_in, tokens_out)
            groups.append((plan.system, system_cost, system_charges))
        else:
            system_charges = [self.lease(s, at) for s in plan.system if s.kind == "budget"]
        if plan.providers:
            for provider in {e.provider for e in allowed} & plan.providers.keys():
                groups.append((plan.providers[provider], 0.0, None))
        for specs, budget_cost, charged in groups:
            for spec in specs:
                if spec.kind == "budget":
                    amount = budget_cost
                    lease = self.lease(spec, at)
                    if charged is not None:
                        charged.append(lease)
                else:
                    amount = tokens if spec.limit == "tokens_per_minute" else 1.0
                    lease = leases.get(spec.key) or self.lease(spec, at)
                lease.take(amount, epoch)
                lease.last_used = now
                lease.taken += amount
                takes.append(Take(lease, amount, epoch))
        return Admission(allowed, takes, charges, system_charges, excluded)

    def _amount(self, spec: LimitSpec, tokens: float, cost: float) -> float:
        if spec.kind == "budget":
            return cost
        return tokens if spec.counts_tokens else 1.0

    def _short(
        self,
        specs: Iterable[LimitSpec],
        tokens: float,
        at: datetime,
        needs: dict[str, float],
        budget_cost: float = 0.0,
    ) -> LimitSpec | None:
        """The first spec without room for the request (noting what it needs), or ``None``."""
        first = None
        leases = self._leases
        for spec in specs:
            # The hot path: _amount, lease() and room() inlined (this runs per limit per request).
            if spec.kind == "budget":
                amount = budget_cost
                if amount <= 0.0:
                    continue  # a free model spends nothing: budgets do not govern it
                lease = leases.get(spec.key)
                if lease is None or lease.bounds is None or at >= lease.bounds.end:
                    lease = self.lease(spec, at)
                room = lease.held - lease.reserved - lease.pending
            else:
                amount = tokens if spec.limit == "tokens_per_minute" else 1.0
                if amount <= 0.0:
                    continue
                lease = leases.get(spec.key) or self.lease(spec, at)
                room = lease.held - lease.unreported
            if room + 1e-12 < amount:
                needs[spec.key] = amount
                first = first or spec
        return first

    @staticmethod
    def _worst(entries: Sequence[Entry], tokens_in: int, tokens_out: int) -> float:
        costs = [_entry_cost(e, tokens_in, tokens_out) for e in entries]
        return max((c for c in costs if c is not None), default=0.0)

    def _within_budget(
        self,
        plan: QuotaPlan,
        whole: Sequence[LimitSpec],
        entries: list[Any],
        tokens_in: int,
        tokens_out: int,
        at: datetime,
    ) -> tuple[list[Any], float]:
        """With the budget spent: free models only, or (``cheapest``) the cheapest that fit."""
        room = min((self.lease(s, at).room() for s in whole if s.kind == "budget"), default=0.0)
        costs = [(_entry_cost(e, tokens_in, tokens_out) or 0.0, e) for e in entries]
        free = [e for c, e in costs if c == 0.0]
        if plan.on_exhausted == "cheapest":
            fitting = sorted(
                ((c, i, e) for i, (c, e) in enumerate(costs) if c <= room),
                key=lambda t: (t[0], t[1]),
            )
            if fitting:
                cheapest = fitting[0][0]
                kept = [e for c, _, e in fitting if c == cheapest]
                return kept, cheapest
        return free, 0.0

    def _check_alerts(self, lease: Lease, spent: float, refused: bool = False) -> None:
        """Fire each threshold the spend reached (1.0 also on the first refusal), once."""
        spec, bounds = lease.spec, lease.bounds
        if self.alerts is None or bounds is None or spec.allowed <= 0:
            return
        for threshold in spec.alert_at:
            reached = spent >= threshold * spec.allowed or (refused and threshold == 1.0)
            if reached and threshold not in lease.alerted:
                lease.alerted.add(threshold)
                self.alerts.fire(
                    tenant_id=spec.tenant_id,
                    scope=spec.scope,
                    user_id=spec.user_id,
                    period_start=bounds.start,
                    threshold=threshold,
                    spent_usd=spent,
                    max_usd=spec.allowed,
                )
        lease.alert_floor = min(
            (t * spec.allowed for t in spec.alert_at if t not in lease.alerted),
            default=float("inf"),
        )

    def _refusal(self, spec: LimitSpec, detail: str) -> QuotaExceededError:
        self.refusals += 1
        at = datetime.fromtimestamp(self.wall(), UTC)
        lease = self.lease(spec, at)
        if spec.kind == "budget" and spec.alert_at:
            spent = lease.committed + lease.written + lease.pending
            self._check_alerts(lease, spent, refused=True)
        if spec.kind == "budget":
            bounds = lease.bounds or spec.bounds(at)
            retry_after = max(0.0, (bounds.end - at).total_seconds())
            resets_at = bounds.end
            cls: type[QuotaExceededError] = BudgetExceededError
        else:
            oldest = lease.oldest
            horizon = spec.window_s + spec.bucket_s
            retry_after = (
                spec.bucket_s
                if oldest is None
                else max(spec.bucket_s, oldest + horizon - at.timestamp())
            )
            resets_at = at + timedelta(seconds=retry_after)
            cls = QuotaExceededError
        return cls(
            scope=spec.scope,
            limit=spec.limit,
            used=lease.used(),
            allowed=spec.allowed,
            retry_after=retry_after,
            resets_at=resets_at,
            detail=detail,
        )

    # --- settling ----------------------------------------------------------------------------

    def charge(
        self, admission: Admission, usage_id: uuid.UUID, cost: float | None, system_key: bool
    ) -> None:
        """An attempt's row was made with ``cost``: it is pending until the row is written."""
        if not cost:
            return
        leases = admission.charges + (admission.system_charges if system_key else [])
        for lease in leases:
            lease.pending += cost
        if leases:
            self._pending[usage_id] = [(lease, cost) for lease in leases]

    def release(self, admission: Admission, tokens_used: int | None = None) -> None:
        """The request ended: free its reservations; a tpm limit keeps the tokens really used."""
        if admission.settled:
            return
        admission.settled = True
        for take in admission.takes:
            lease = take.lease
            if lease.spec.kind == "budget":
                lease.reserved = max(0.0, lease.reserved - take.amount)
            elif lease.spec.counts_tokens and tokens_used is not None:
                lease.give_back(take.amount - tokens_used, take.epoch)

    def rows_settled(self, usage_ids: Iterable[uuid.UUID]) -> None:
        """Rows left memory (written, or spooled to be counted when replayed)."""
        pending = self._pending
        if not pending:
            return
        for usage_id in usage_ids:
            charged = pending.pop(usage_id, None)
            if charged:
                for lease, cost in charged:
                    # The spend is now in the counters: it leaves the lease for good.
                    lease.pending = max(0.0, lease.pending - cost)
                    lease.held = max(0.0, lease.held - cost)
                    lease.written += cost
                    lease.settled += cost
                    if lease.spec.alert_at:
                        spent = lease.committed + lease.written
                        if spent >= lease.alert_floor:
                            self._check_alerts(lease, spent)

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
                for k, lease in self._leases.items()
                if now - lease.last_used >= IDLE_AFTER and (lease.held > 0 or lease.unreported)
            ]
            if self._renewing is None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._start_renewal(release=idle))

    async def close(self) -> None:
        """Stop renewing and give every lease back (best effort)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        with contextlib.suppress(Exception):
            await self._renew_now(release=list(self._leases))
            await self.client.release()
