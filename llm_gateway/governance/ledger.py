"""One process's share of each limit: leases held, reservations in flight, uses not yet reported.

Everything here is synchronous and in memory; :mod:`.leases` talks to PostgreSQL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from .limits import LimitSpec, budget_request
from .periods import PeriodBounds

__all__ = ["Lease", "Take"]

# Of the allowance, the most that all idle leases of one limit may hold together: the "no
# refusal while more than 5 % is left" promise, with a margin.
IDLE_SHARE = 0.04


@dataclass(slots=True)
class Lease:
    """This process's state of one limit (for budgets: of the current period).

    Rates: ``held`` slots were granted at the last renewal; each admission uses some at once
    (``uses``, by bucket, reported at the next renewal). Budgets: ``held`` US dollars cover the
    reservations of requests in flight and the spend settled but not yet written as usage rows.
    """

    spec: LimitSpec
    held: float = 0.0
    reserved: float = 0.0  # budgets: worst-case cost of requests in flight
    pending: float = 0.0  # budgets: settled cost whose rows are not yet written
    uses: dict[int, float] = field(default_factory=dict)  # rates: bucket index -> amount
    unreported: float = 0.0  # rates: sum of ``uses``
    committed: float = 0.0  # as of the last renewal: uses in the window / spend in the period
    others: float = 0.0  # as of the last renewal: what other processes hold
    holders: int = 0  # other processes holding a lease
    oldest: float | None = None  # rates: epoch of the oldest use in the window
    renewed_at: float = -math.inf  # monotonic
    last_used: float = -math.inf  # monotonic
    demand: float = 0.0  # EWMA of the amount taken per renew interval, to size the next lease
    taken: float = 0.0  # amount taken since the last renewal (for ``demand``)
    bounds: PeriodBounds | None = None  # budgets: the period the lease belongs to
    known: bool = False  # at least one renewal answered
    short_at: float = -math.inf  # monotonic: the last renewal granted less than asked
    alerted: set[float] = field(default_factory=set)  # thresholds fired (or tried) this period
    alert_floor: float = 0.0  # spend below which no threshold is left to fire (0: unknown)
    written: float = 0.0  # budgets: own spend written since the last renewal (for alerts)
    needed: float = 0.0  # what the last renewal asked for beyond the optional slice
    settled: float = 0.0  # budgets: all spend moved from pending to written, ever

    def room(self) -> float:
        """What this process may still admit from its lease."""
        if self.spec.kind == "rate":
            return self.held - self.unreported
        return self.held - self.reserved - self.pending

    def used(self) -> float:
        """The limit's use as far as this process knows: committed, others' and its own."""
        own = self.unreported if self.spec.kind == "rate" else self.reserved + self.pending
        return self.committed + self.others + own

    def take(self, amount: float, epoch: float) -> None:
        if self.spec.kind == "rate":
            bucket = int(epoch // self.spec.bucket_s)
            self.uses[bucket] = self.uses.get(bucket, 0.0) + amount
            self.unreported += amount
        else:
            self.reserved += amount

    def give_back(self, amount: float, epoch: float) -> None:
        """Undo :meth:`take` (another limit refused the request)."""
        if self.spec.kind == "rate":
            bucket = int(epoch // self.spec.bucket_s)
            self.uses[bucket] = self.uses.get(bucket, 0.0) - amount
            self.unreported -= amount
        else:
            self.reserved = max(0.0, self.reserved - amount)

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
            slice_ = float(int(slice_))  # whole slots: fractions of one would strand it
            uses = [[b * spec.bucket_s, n] for b, n in self.uses.items() if n]
            keep = max(0.0, self.held - self.unreported)
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
            return request, (dict(self.uses), self.unreported)
        bounds = self.bounds if self.bounds is not None else spec.bounds(at)
        want = self.reserved + self.pending + need + slice_
        self.needed = want - slice_
        return budget_request(spec, bounds, want), (bounds, self.settled)

    def apply(self, answer: dict[str, Any], snapshot: Any, now: float) -> None:
        """Take in the renewal's answer; what was used meanwhile stays to be reported."""
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
            self.unreported -= sent_total
        else:
            # Spend written during the round trip was asked for as pending, and may also be
            # in the answer's committed: it leaves the lease (the safe side).
            self.bounds, settled = snapshot
            self.held = max(0.0, self.held - (self.settled - settled))
            # That spend was in what was needed too: it is no shortage of the grant.
            needed -= self.settled - settled
        if self.held + 1e-12 < needed:
            self.short_at = now  # not even what was needed: the limit is reached


class Take(NamedTuple):
    """What one admitted request took from one lease, to settle or give back.

    A tuple: one is made per limit of every admitted request (cheaper than a dataclass)."""

    lease: Lease
    amount: float
    epoch: float
