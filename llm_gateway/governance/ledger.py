"""One process's share of each limit: leases held, reservations in flight, uses not yet reported.

Everything here is synchronous and in memory; :mod:`.leases` talks to PostgreSQL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .limits import LimitSpec, budget_request
from .periods import PeriodBounds

__all__ = ["Lease"]

# Of the allowance, the most that all idle leases of one limit may hold together: the "no
# refusal while more than 5 % is left" promise, with a margin.
IDLE_SHARE = 0.04


@dataclass(slots=True, eq=False)
class Lease:
    """This process's state of one limit (for budgets: of the current period).

    ``free`` is what this process may still admit from its lease, kept up to date by every
    take, so admission reads one field per limit. Rates: ``held`` slots were granted at the
    last renewal; ``held - free`` of them were used since (``unreported``): by bucket in
    ``uses``, except the current bucket's, which is whatever the rest does not account for
    (so a take is one subtraction). Budgets: ``held`` US dollars cover the reservations of
    requests in flight (``reserved``) and the spend settled but not yet written (``pending``).
    """

    spec: LimitSpec
    held: float = 0.0
    free: float = 0.0  # held - unreported (rates) / held - reserved - pending (budgets)
    pending: float = 0.0  # budgets: settled cost whose rows are not yet written
    uses: dict[int, float] = field(default_factory=dict)  # rates: bucket -> amount, but `bucket`
    uses_sum: float = 0.0  # rates: sum of ``uses``
    bucket: int = -(2**62)  # rates: the current bucket (its uses are not in ``uses`` yet)
    committed: float = 0.0  # as of the last renewal: uses in the window / spend in the period
    others: float = 0.0  # as of the last renewal: what other processes hold
    holders: int = 0  # other processes holding a lease
    oldest: float | None = None  # rates: epoch of the oldest use in the window
    renewed_at: float = -math.inf  # monotonic
    last_used: float = -math.inf  # monotonic, to about a second (set when a draw rolls over)
    demand: float = 0.0  # EWMA of the amount taken per renew interval, to size the next lease
    taken: float = 0.0  # budgets: amount reserved since the last renewal (for ``demand``)
    bounds: PeriodBounds | None = None  # budgets: the period the lease belongs to
    ends_at: float = math.inf  # epoch of ``bounds.end`` (a float compare per request)
    known: bool = False  # at least one renewal answered
    short_at: float = -math.inf  # monotonic: the last renewal granted less than asked
    short_free: float = 0.0  # ``free`` then: more since (a request ended) is worth asking again
    alerted: set[float] = field(default_factory=set)  # thresholds fired (or tried) this period
    alert_floor: float = 0.0  # spend below which no threshold is left to fire (0: unknown)
    written: float = 0.0  # budgets: own spend written since the last renewal (for alerts)
    needed: float = 0.0  # what the last renewal asked for beyond the optional slice
    settled: float = 0.0  # budgets: all spend moved from pending to written, ever

    @classmethod
    def of(cls, spec: LimitSpec, epoch: float) -> Lease:
        """A fresh lease of ``spec`` (a budget's, of the period that contains ``epoch``)."""
        if spec.kind != "budget":
            return cls(spec)
        bounds = spec.bounds(datetime.fromtimestamp(epoch, UTC))
        return cls(spec, bounds=bounds, ends_at=bounds.end.timestamp())

    @property
    def rate(self) -> bool:
        return self.spec.kind == "rate"

    @property
    def unreported(self) -> float:
        """Rates: uses not yet reported to PostgreSQL."""
        return self.held - self.free if self.rate else 0.0

    @property
    def reserved(self) -> float:
        """Budgets: worst-case cost of the requests in flight."""
        return 0.0 if self.rate else max(0.0, self.held - self.free - self.pending)

    def room(self) -> float:
        """What this process may still admit from its lease."""
        return self.free

    def used(self) -> float:
        """The limit's use as far as this process knows: committed, others' and its own."""
        return self.committed + self.others + (self.held - self.free)

    # --- rates: uses by bucket --------------------------------------------------------------

    def roll(self, epoch: float, now: float) -> None:
        """A new second began for a draw holding this lease: close the bucket if it ended."""
        self.last_used = now
        bucket = int(epoch // self.spec.bucket_s)
        if bucket > self.bucket:
            self._close_bucket()
            self.bucket = bucket

    def _close_bucket(self) -> None:
        amount = self.held - self.free - self.uses_sum
        if amount:
            self.uses[self.bucket] = self.uses.get(self.bucket, 0.0) + amount
            self.uses_sum += amount

    def give_back(self, amount: float, epoch: float) -> None:
        """Undo part of a rate take made at ``epoch`` (a request used fewer tokens)."""
        self.free += amount
        bucket = int(epoch // self.spec.bucket_s)
        if bucket != self.bucket:  # a closed bucket: counted in ``uses`` already
            self.uses[bucket] = self.uses.get(bucket, 0.0) - amount
            self.uses_sum -= amount

    # --- budgets: settling --------------------------------------------------------------------

    def charge(self, cost: float) -> None:
        """An attempt's cost, pending until its row is written."""
        self.pending += cost
        self.free -= cost

    def settle(self, cost: float) -> None:
        """The row of ``cost`` was written: the spend is in the counters, it leaves the lease."""
        pending = self.pending - cost
        self.pending = pending if pending > 0.0 else 0.0
        held = self.held - cost
        if held >= 0.0:
            self.held = held  # free is unchanged: the cost leaves pending and held alike
        else:  # spent more than held: the lease is empty, what it lacked is not free
            self.free -= held
            self.held = 0.0
        self.written += cost
        self.settled += cost

    # --- renewal ---------------------------------------------------------------------------

    def renewal(self, need: float, at: datetime) -> tuple[dict[str, Any], Any]:
        """The request for ``llm_gateway_quota_renew`` and a snapshot to apply its answer with.

        Asks for what this process holds unused (or in flight) plus ``need`` plus a slice sized
        from recent demand, capped so idle slices of all processes stay a small share.
        """
        spec = self.spec
        # Beyond what it needs now, a process holds at most its share of IDLE_SHARE: idle
        # slices of all processes together never strand more than that of the allowance.
        cap = IDLE_SHARE * spec.allowed / (self.holders + 1)
        slice_ = min(self.demand * 2.0, cap)
        if spec.kind == "rate":
            self._close_bucket()  # every use is in ``uses`` now
            slice_ = float(int(slice_))  # whole slots: fractions of one would strand it
            uses = [[b * spec.bucket_s, n] for b, n in self.uses.items() if n]
            keep = max(0.0, self.free)
            request = {
                "key": spec.key,
                "kind": "rate",
                "limit": spec.allowed,
                "window_s": spec.window_s,
                "bucket_s": spec.bucket_s,
                "want": keep + need + slice_,
                "uses": uses,
            }
            self.needed = keep + need
            return request, (dict(self.uses), self.uses_sum)
        bounds = self.bounds if self.bounds is not None else spec.bounds(at)
        want = (self.held - self.free) + need + slice_
        self.needed = want - slice_
        return budget_request(spec, bounds, want), (bounds, self.settled)

    def apply(self, answer: dict[str, Any], snapshot: Any, now: float) -> None:
        """Take in the renewal's answer; what was used meanwhile stays to be reported."""
        in_use = self.held - self.free  # unreported uses / reserved + pending
        self.held = float(answer["granted"])
        needed = self.needed
        self.committed = float(answer["committed"])
        self.others = float(answer["others"])
        self.holders = int(answer.get("holders") or 0)
        self.oldest = answer.get("oldest")
        self.known = True
        self.written = 0.0
        if self.spec.kind == "rate":
            sent, sent_total = snapshot
            for bucket, n in sent.items():
                left = self.uses.get(bucket, 0.0) - n
                if abs(left) < 1e-9:
                    self.uses.pop(bucket, None)
                else:
                    self.uses[bucket] = left
            self.uses_sum -= sent_total
            in_use -= sent_total
        else:
            # Spend written during the round trip was asked for as pending, and may also be
            # in the answer's committed: it leaves the lease (the safe side).
            self.bounds, settled = snapshot
            self.held = max(0.0, self.held - (self.settled - settled))
            # That spend was in what was needed too: it is no shortage of the grant.
            needed -= self.settled - settled
        self.free = self.held - in_use
        if self.held + 1e-12 < needed:
            self.short_at = now  # not even what was needed: the limit is reached
            self.short_free = self.free
