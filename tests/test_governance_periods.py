"""Budget periods: calendar units in UTC, anchored runs of days, calendar months."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from llm_gateway.governance.periods import PERIODS, period_bounds


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("period", "at", "start", "end"),
    [
        (
            "1m",
            utc(2026, 12, 3, 7, 59, 59, 999999),
            utc(2026, 12, 3, 7, 59),
            utc(2026, 12, 3, 8, 0),
        ),
        ("1h", utc(2026, 12, 3, 7, 0), utc(2026, 12, 3, 7), utc(2026, 12, 3, 8)),
        ("1d", utc(2026, 12, 31, 23, 59), utc(2026, 12, 31), utc(2027, 1, 1)),
        ("1mo", utc(2026, 12, 15), utc(2026, 12, 1), utc(2027, 1, 1)),
        ("1mo", utc(2028, 2, 29, 12), utc(2028, 2, 1), utc(2028, 3, 1)),
        ("1mo", utc(2026, 1, 1), utc(2026, 1, 1), utc(2026, 2, 1)),
    ],
)
def test_calendar_periods(period: str, at: datetime, start: datetime, end: datetime) -> None:
    bounds = period_bounds(period, at)
    assert (bounds.start, bounds.end) == (start, end)


def test_non_utc_instant_is_converted() -> None:
    # 00:30 at UTC+2 is 22:30 UTC of the day before: the 1d budget of that day.
    at = datetime(2026, 12, 3, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    assert period_bounds("1d", at).start == utc(2026, 12, 2)
    assert period_bounds("1d", at.replace(tzinfo=None)).start == utc(2026, 12, 3)


def test_anchored_runs_of_days() -> None:
    anchor = date(2026, 11, 30)
    assert period_bounds("7d", utc(2026, 11, 30), anchor).start == utc(2026, 11, 30)
    assert period_bounds("7d", utc(2026, 12, 6, 23, 59), anchor).end == utc(2026, 12, 7)
    assert period_bounds("7d", utc(2026, 12, 7), anchor).start == utc(2026, 12, 7)
    # Before the anchor, periods run backwards from it.
    assert period_bounds("30d", utc(2026, 11, 29), anchor).start == utc(2026, 10, 31)
    # Default anchor: 1970-01-01 (a Thursday), so 7d periods start on Thursdays.
    start = period_bounds("7d", utc(2026, 12, 3, 12)).start
    assert start.weekday() == 3 and start <= utc(2026, 12, 3, 12) < start + timedelta(days=7)


def test_every_instant_is_inside_its_period() -> None:
    at = utc(2026, 3, 1)
    for period in PERIODS:
        for minutes in range(0, 60 * 24 * 40, 997):
            instant = at + timedelta(minutes=minutes, seconds=minutes % 59)
            b = period_bounds(period, instant, date(2026, 2, 17))
            assert b.start <= instant < b.end
            assert period_bounds(period, b.end, date(2026, 2, 17)).start == b.end


def test_unknown_period() -> None:
    with pytest.raises(ValueError, match="unknown budget period '2w'"):
        period_bounds("2w", utc(2026, 1, 1))
