"""What the analytics back-fill has left, so answers read from unfinished rollups say so.

A database that had rows before migration 009 gets its daily analytics rollups
(``model_usage_user_day``, ``model_usage_endpoint_daily``, ``model_usage_latency_daily``,
``model_usage_tag_daily``) filled after the migration, in batches of whole days, newest first:
by maintenance (a day per run) or by ``llm-gateway db backfill``. Until then, reports by user,
endpoint or tag and the recommendations miss the days not yet done. Anomaly scores not yet
stored (migration 012) only make detection slower, never different.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

__all__ = ["BackfillState", "backfill_state", "reads_daily_rollups"]

_HAS_STATE_SQL = "SELECT to_regproc('llm_gateway_usage_analytics_backfill_state') IS NOT NULL"
_STATE_SQL = "SELECT * FROM llm_gateway_usage_analytics_backfill_state()"


@dataclass(frozen=True, slots=True)
class BackfillState:
    """``rollups_pending_before``: the daily rollups lack the days before it that have rows
    (None: complete). ``scores_from``/``scores_to``: the hours whose anomaly scores are stored."""

    rollups_pending_before: date | None
    rollup_days_left: int
    scores_from: datetime | None
    scores_to: datetime | None
    score_days_left: int

    def note(self, since: datetime) -> str | None:
        """A sentence for a reader of the daily rollups from ``since``, if they are not
        complete for that window."""
        before = self.rollups_pending_before
        if before is None or since.astimezone(UTC).date() >= before:
            return None
        return (
            f"the daily analytics rollups are still being back-filled: days before {before}"
            f" ({self.rollup_days_left} left) are missing from this answer; run"
            " `llm-gateway db backfill` or let maintenance finish"
        )


def reads_daily_rollups(by: str, user: bool) -> bool:
    """Whether ``usage_report(by=by)`` (with a user or not) reads the rollups of 009."""
    return by in ("user", "endpoint", "tag") and not user


async def backfill_state(pool: asyncpg.Pool[asyncpg.Record]) -> BackfillState | None:
    """The back-fill's state; None on a schema before migration 012."""
    async with pool.acquire() as conn:
        if not await conn.fetchval(_HAS_STATE_SQL):
            return None
        r = await conn.fetchrow(_STATE_SQL)
    assert r is not None  # a function with OUT parameters: always one row
    return BackfillState(
        rollups_pending_before=r["rollups_pending_before"],
        rollup_days_left=r["rollup_days_left"],
        scores_from=r["scores_from"],
        scores_to=r["scores_to"],
        score_days_left=r["score_days_left"],
    )
