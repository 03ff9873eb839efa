"""Admission: may this request run, on which chain entries, and what does it hold meanwhile.

The cached path (:meth:`Governor.admit_now`) is in memory: the request's draw (see
:mod:`.plan`) lists its leases, each has room, the request takes its share and runs. A lease
without room is renewed first (:mod:`.leases`: one statement for every lease that needs it,
shared by concurrent requests); only then is a request refused or steered.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from .alerts import AlertSink, check_alerts
from .leases import LeaseBook, LeaseClient
from .ledger import Lease
from .limits import LimitSpec
from .plan import SYSTEM_BIT, Draw, QuotaPlan, build_draw, find_draw
from .shortage import Entry, Short, refusal, shortage, steering

__all__ = ["Admission", "Entry", "Governor", "QuotaPlan"]

log = logging.getLogger("llm_gateway.governance")

OnDbError = Literal["open", "closed"]
# After a renewal that could not grant what was asked, requests short of that lease are refused
# without asking again for this long: refusals do not cost a statement each.
SHORT_BACKOFF = 0.02
RENEW_ROUNDS = 16  # renewals one request may wait on before it is refused
_ROOM = 1.0 - 1e-12  # a request slot fits when this much is free (float noise)


@dataclass(slots=True, eq=False)
class Admission:
    """An admitted request: the entries it may use and what it took from its draw's leases."""

    entries: list[Any]
    draw: Draw | None  # None: admitted without leases (PostgreSQL down, policy "open")
    tokens: float  # taken from each tokens_per_minute lease
    cost: float  # reserved on each tenant/user budget
    sys_cost: float  # reserved on each system-key budget
    epoch: float  # when (a rate's bucket)
    excluded: dict[str, str]  # provider -> why a quota removed it from the chain
    settled: bool = False


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
        self.on_db_error = on_db_error
        self.clock = clock
        self.wall = wall
        self.book = LeaseBook(
            client,
            renew_interval=renew_interval,
            retry_db_after=retry_db_after,
            clock=clock,
            wall=wall,
            on_renewed=self._renewed,
        )
        self._leases = self.book.leases
        self._pending: dict[uuid.UUID, tuple[tuple[Lease, ...], float]] = {}
        self.refusals = 0
        self.opened = 0  # admitted without a lease while PostgreSQL failed

    # --- leases ----------------------------------------------------------------------------

    def lease(self, spec: LimitSpec, at: datetime | float) -> Lease:
        """The current lease of a spec (a budget's lease of the current period)."""
        return self.book.lease(spec, at if isinstance(at, float) else at.timestamp())

    def _renewed(self, lease: Lease) -> None:
        if lease.spec.alert_at:
            check_alerts(self.alerts, lease, lease.committed)

    async def _renew(self, needs: dict[str, float]) -> None:
        await self.book.renew(needs)

    async def refresh(self, leases: Iterable[Lease]) -> None:
        """Renew ``leases`` now (for reporting): what they hold is asked for again."""
        await self.book.renew({lease.spec.key: 0.0 for lease in leases})

    def start(self) -> None:
        self.book.start()

    async def close(self) -> None:
        """Stop renewing and give every lease back (best effort)."""
        await self.book.close()

    def rate_resets_at(self, lease: Lease, at: datetime) -> datetime:
        """When the oldest use in a rate window leaves it (``at`` if none is known)."""
        spec = lease.spec
        if lease.oldest is None:
            return at
        return datetime.fromtimestamp(lease.oldest + spec.window_s + spec.bucket_s, UTC)

    def steering(
        self, plan: QuotaPlan, entries: Sequence[Entry], tokens_in: int, tokens_out: int
    ) -> dict[str, str]:
        """Providers a quota would remove from ``entries`` now, with why (for ``explain``;
        from what this process holds, no I/O, nothing taken)."""
        return steering(self.book, plan, entries, tokens_in, tokens_out, self.wall())

    # --- admission ---------------------------------------------------------------------------

    def admit_now(
        self,
        plan: QuotaPlan,
        user_specs: Sequence[LimitSpec],
        entries: Sequence[Entry],
        tokens_in: int,
        tokens_out: int,
    ) -> Admission | None:
        """The cached path: every limit has room for the whole chain -> admitted (no I/O);
        ``None`` when a limit is short or a model unpriced (:meth:`admit` decides)."""
        bits = plan.bits
        mask = 0
        cost = sys_cost = 0.0
        unpriced = False
        for e in entries:  # one pass: worst-case costs and the chain's shape
            system = e.key_source == "system"
            if system:
                mask |= SYSTEM_BIT
            if bits:
                mask |= bits.get(e.provider, 0)
            price = e.price_per_m
            if price is None:
                unpriced = True
                continue
            c = (tokens_in * price[0] + tokens_out * price[1]) / 1e6
            if c > cost:
                cost = c
            if system and c > sys_cost:
                sys_cost = c
        epoch = self.wall()
        draw = plan.draws.get((id(user_specs), mask))  # find_draw, inlined (the hot path)
        if (
            draw is None
            or epoch >= draw.valid_until
            or draw.owner is not self
            or draw.specs is not user_specs
        ):
            draw = build_draw(plan, user_specs, mask, self.book.lease, epoch, self)
        if unpriced and draw.costs and not plan.allow_unpriced:
            return None  # a budget drops unpriced entries (or refuses): the full path
        tokens = float(tokens_in + tokens_out)
        for lease in draw.ones:
            if lease.free < _ROOM:
                return None
        for lease in draw.toks:
            if lease.free + 1e-12 < tokens:
                return None
        if cost > 0.0:
            for lease in draw.costs:
                if lease.free + 1e-12 < cost:
                    return None
        if sys_cost > 0.0:
            for lease in draw.sys_costs:
                if lease.free + 1e-12 < sys_cost:
                    return None
        return self._take(draw, list(entries), tokens, cost, sys_cost, epoch, {})

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
        admitted = self.admit_now(plan, user_specs, entries, tokens_in, tokens_out)
        if admitted is not None:
            return admitted
        book = self.book
        for _ in range(RENEW_ROUNDS):
            result = self._try_admit(plan, user_specs, entries, tokens_in, tokens_out, final=False)
            if isinstance(result, Admission):
                return result
            now = self.clock()
            # Again after a renewal: while this request waited, others may have taken the room
            # of a lease that had enough before (a few rounds, then it is refused).
            needs = {k: a for k, a in result.needs.items() if self._may_ask(self._leases[k], now)}
            if not needs or now < book.db_down_until:
                break
            await book.renew(needs)
        db_down = self.clock() < book.db_down_until
        result = self._try_admit(plan, user_specs, entries, tokens_in, tokens_out, final=True)
        if isinstance(result, Admission):
            return result
        if db_down and self.on_db_error == "open":
            # PostgreSQL is failing and this process's share is spent: serve (counted, logged).
            self.opened += 1
            return Admission(list(entries), None, 0.0, 0.0, 0.0, 0.0, {})
        # A budget short of this request keeps room only if nothing else can use it: what it
        # holds beyond its requests in flight (its share of what was left) goes back, so the
        # next process to ask gets it with its own (else each strands up to a request's cost).
        spent = [
            k for k in result.needs if not self._leases[k].rate and self._leases[k].free > 1e-12
        ]
        if spent and not db_down:
            with contextlib.suppress(Exception):
                await book.give_back(spent)
        raise self._refusal(result)

    @staticmethod
    def _may_ask(lease: Lease, now: float) -> bool:
        """Renew a short lease again: after the backoff, or sooner if a request ended since
        (its room adds to what is left; a short lease gave the rest back)."""
        return now - lease.short_at >= SHORT_BACKOFF or lease.free > lease.short_free + 1e-12

    def _try_admit(
        self,
        plan: QuotaPlan,
        user_specs: Sequence[LimitSpec],
        entries: Sequence[Entry],
        tokens_in: int,
        tokens_out: int,
        *,
        final: bool,
    ) -> Admission | Short:
        """The full path: an admission, or the limit that refuses (see ``shortage``)."""
        epoch = self.wall()
        found = shortage(
            self.book, plan, user_specs, entries, tokens_in, tokens_out, epoch, final=final
        )
        if isinstance(found, Short):
            return found
        allowed = found.entries
        mask = SYSTEM_BIT if any(e.key_source == "system" for e in allowed) else 0
        for e in allowed:
            mask |= plan.bits.get(e.provider, 0)
        draw = find_draw(plan, user_specs, mask, self.book.lease, epoch, self)
        tokens = float(tokens_in + tokens_out)
        return self._take(draw, allowed, tokens, found.cost, found.sys_cost, epoch, found.excluded)

    def _refusal(self, short: Short) -> Exception:
        self.refusals += 1
        at = datetime.fromtimestamp(self.wall(), UTC)
        return refusal(self.book, short.spec, short.detail, at, self.alerts)

    def _take(
        self,
        draw: Draw,
        allowed: list[Any],
        tokens: float,
        cost: float,
        sys_cost: float,
        epoch: float,
        excluded: dict[str, str],
    ) -> Admission:
        """Everything fits: take the request's share from every lease of its draw."""
        second = int(epoch)
        if draw.second != second:  # at most once a second per draw: buckets, idle times
            draw.second = second
            now = self.clock()
            for lease in draw.rates:
                lease.roll(epoch, now)
            for lease in draw.budgets:
                lease.last_used = now
        for lease in draw.ones:
            lease.free -= 1.0
        for lease in draw.toks:
            lease.free -= tokens
        if cost > 0.0:
            for lease in draw.costs:
                lease.free -= cost
                lease.taken += cost
        if sys_cost > 0.0:
            for lease in draw.sys_costs:
                lease.free -= sys_cost
                lease.taken += sys_cost
        return Admission(allowed, draw, tokens, cost, sys_cost, epoch, excluded)

    # --- settling ----------------------------------------------------------------------------

    def charge(
        self, admission: Admission, usage_id: uuid.UUID, cost: float | None, system_key: bool
    ) -> None:
        """An attempt's row was made with ``cost``: it is pending until the row is written."""
        draw = admission.draw
        if not cost or draw is None:
            return
        leases = draw.sys_charges if system_key else draw.charges
        if leases:
            for lease in leases:
                lease.pending += cost
                lease.free -= cost
            self._pending[usage_id] = (leases, cost)

    def release(self, admission: Admission, tokens_used: int | None = None) -> None:
        """The request ended: free its reservations; a tpm limit keeps the tokens really used."""
        if admission.settled:
            return
        admission.settled = True
        draw = admission.draw
        if draw is None:
            return
        cost = admission.cost
        if cost > 0.0:
            for lease in draw.costs:
                lease.free += cost
        cost = admission.sys_cost
        if cost > 0.0:
            for lease in draw.sys_costs:
                lease.free += cost
        if tokens_used is not None and draw.toks:
            back = admission.tokens - tokens_used
            if back:
                for lease in draw.toks:
                    lease.give_back(back, admission.epoch)

    def rows_settled(self, usage_ids: Iterable[uuid.UUID]) -> None:
        """Rows left memory (written, or spooled to be counted when replayed)."""
        pending = self._pending
        if not pending:
            return
        for usage_id in usage_ids:
            charged = pending.pop(usage_id, None)
            if charged is not None:
                leases, cost = charged
                for lease in leases:
                    lease.settle(cost)  # the spend is now in the counters
                    if lease.spec.alert_at:
                        spent = lease.committed + lease.written
                        if spent >= lease.alert_floor:
                            check_alerts(self.alerts, lease, spent)
