"""Hours of the hourly rollup still to recompute after spool replays, retried until done.

Maintenance recomputes only the last few hours; rows replayed from a spool after a long outage
are older, so the writer recomputes their hours itself. A refresh that fails (a lock timeout,
a connection loss) keeps its range, and is retried with backoff: otherwise those hours would
stay wrong for good.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .connection import WriterLink

__all__ = ["PendingRollup"]

_MAX_RANGES = 16  # beyond this, pending ranges merge into one span (bounded memory)


class PendingRollup:
    """Time ranges whose rollup must be recomputed, merged when they overlap or touch."""

    def __init__(self, *, first_backoff: float, max_backoff: float) -> None:
        self.ranges: list[tuple[datetime, datetime]] = []
        self._first_backoff = first_backoff
        self._max_backoff = max(first_backoff, max_backoff)
        self._backoff = first_backoff
        self._next_try = 0.0

    def __len__(self) -> int:
        return len(self.ranges)

    def add(self, since: datetime, until: datetime) -> None:
        """Remember ``[since, until)``."""
        ranges = sorted([*self.ranges, (since, until)])
        merged = [ranges[0]]
        for lo, hi in ranges[1:]:
            last_lo, last_hi = merged[-1]
            if lo <= last_hi + timedelta(hours=1):  # the rollup is hourly: touching is enough
                merged[-1] = (last_lo, max(last_hi, hi))
            else:
                merged.append((lo, hi))
        if len(merged) > _MAX_RANGES:
            merged = [(merged[0][0], max(hi for _, hi in merged))]
        self.ranges = merged

    def due(self) -> bool:
        """Something is pending and the backoff after the last failure has passed."""
        return bool(self.ranges) and time.monotonic() >= self._next_try

    async def refresh(self, link: WriterLink) -> None:
        """Recompute the pending ranges in order; stop at the first failure (retried later)."""
        while self.ranges:
            since, until = self.ranges[0]
            if not await link.refresh_rollup(since, until):
                self._next_try = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, self._max_backoff)
                return
            self.ranges.pop(0)
            self._backoff = self._first_backoff
