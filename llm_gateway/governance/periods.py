"""Budget periods: which period an instant falls in, and when it resets (all in UTC)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal, get_args

__all__ = ["PERIODS", "Period", "PeriodBounds", "period_bounds"]

Period = Literal["1m", "1h", "1d", "7d", "30d", "1mo"]
PERIODS: tuple[str, ...] = get_args(Period)

_EPOCH = date(1970, 1, 1)
_FIXED = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}
_ROLLING_DAYS = {"7d": 7, "30d": 30}


@dataclass(frozen=True, slots=True)
class PeriodBounds:
    """``start <= instant < end``; both timezone-aware UTC."""

    start: datetime
    end: datetime


def period_bounds(period: str, at: datetime, anchor: date = _EPOCH) -> PeriodBounds:
    """The period of kind ``period`` that contains ``at``.

    ``1m``, ``1h`` and ``1d`` are calendar units in UTC (a ``1d`` budget resets at midnight UTC);
    ``7d`` and ``30d`` are consecutive runs of days counted from ``anchor`` (midnight UTC);
    ``1mo`` is the calendar month in UTC. A naive ``at`` is taken as UTC.

    Raises ``ValueError`` for an unknown period.
    """
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    if period in _FIXED:
        step = _FIXED[period]
        if period == "1m":
            start = at.replace(second=0, microsecond=0)
        elif period == "1h":
            start = at.replace(minute=0, second=0, microsecond=0)
        else:
            start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return PeriodBounds(start, start + step)
    if period in _ROLLING_DAYS:
        days = _ROLLING_DAYS[period]
        origin = datetime(anchor.year, anchor.month, anchor.day, tzinfo=UTC)
        index = (at - origin) // timedelta(days=days)  # floor division: negative before anchor
        start = origin + index * timedelta(days=days)
        return PeriodBounds(start, start + timedelta(days=days))
    if period == "1mo":
        start = datetime(at.year, at.month, 1, tzinfo=UTC)
        end = datetime(at.year + (at.month == 12), at.month % 12 + 1, 1, tzinfo=UTC)
        return PeriodBounds(start, end)
    raise ValueError(f"unknown budget period {period!r}; use one of {', '.join(PERIODS)}")
