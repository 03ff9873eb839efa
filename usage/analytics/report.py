"""Usage reports grouped by day, provider, model, user, endpoint or tag (``llm-gateway usage
report``), each served from the smallest source that can answer it:

* by day, provider or model: ``model_usage_hourly`` for one tenant, ``model_usage_daily_totals``
  for all tenants, ``model_usage_user_daily`` for one user;
* by user: ``model_usage_user_day`` (migration 009);
* by endpoint or tag: ``model_usage_endpoint_daily`` / ``model_usage_tag_daily`` (009); for
  one user, the raw rows of the window (no rollup keeps user and endpoint or tag together).

Rollup sources are refreshed every few minutes by maintenance; day-grained ones start at the
UTC day of ``since``. On a database upgraded to 009 with rows in it, the rollups of 009 lack
the days the back-fill has not reached yet (:mod:`usage.analytics.backfill`).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    import asyncpg

__all__ = ["GROUPINGS", "ReportRow", "parse_since", "usage_report"]

Grouping = Literal["day", "provider", "model", "user", "endpoint", "tag"]
GROUPINGS: Final[tuple[Grouping, ...]] = ("day", "provider", "model", "user", "endpoint", "tag")
_SPAN_RE: Final = re.compile(r"(\d+)([hdw])")
_UNITS: Final = {"h": "hours", "d": "days", "w": "weeks"}

_ROLLUP_ERRORS: Final = "CASE WHEN status <> 'success' THEN requests END"
_RAW_ERRORS: Final = "CASE WHEN status <> 'success' THEN 1 END"


@dataclass(frozen=True, slots=True)
class _Source:
    table: str
    since: str  # predicate on $1
    key: str
    requests: str
    cost: str
    errors: str
    user: str  # column compared with $3


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One group of the report; ``cost_usd`` leaves out requests without a known price."""

    key: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    errors: int


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``"30d"``, ``"12h"``, ``"2w"`` back from now, or a ``YYYY-MM-DD`` (UTC midnight)."""
    found = _SPAN_RE.fullmatch(text.strip())
    clock = now or datetime.now(UTC)
    if found:
        return clock - timedelta(**{_UNITS[found[2]]: int(found[1])})
    try:
        day = date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"since must be like 30d, 12h, 2w or YYYY-MM-DD, not {text!r}") from None
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _source(by: Grouping, tenant: bool, user: bool) -> _Source:
    day_of = "(({} AT TIME ZONE 'UTC')::date)::text"
    day_since = "day >= ($1 AT TIME ZONE 'UTC')::date"
    if by in ("endpoint", "tag") and not user:
        return _Source(
            table="model_usage_endpoint_daily" if by == "endpoint" else "model_usage_tag_daily",
            since=day_since,
            key=by,
            requests="sum(requests)::bigint",
            cost="cost_usd",
            errors="requests - successes" if by == "endpoint" else "errors",
            user="",
        )
    if by in ("endpoint", "tag"):
        return _Source(
            table="model_usage_stats"
            + (" CROSS JOIN LATERAL unnest(tags) AS tag" if by == "tag" else ""),
            since='"timestamp" >= $1' + (" AND tags IS NOT NULL" if by == "tag" else ""),
            key="coalesce(endpoint, '')" if by == "endpoint" else "tag",
            requests="count(*)",
            cost="estimated_cost_usd",
            errors=_RAW_ERRORS,
            user="coalesce(user_id, '')",
        )
    key = {
        "day": "day::text",
        "provider": "provider",
        "model": "provider || '/' || model_name",
        "user": "user_id",
    }[by]
    if by == "user" and not user:
        return _Source(
            "model_usage_user_day", day_since, "user_id", "sum(requests)::bigint", "cost_usd",
            "errors", "user_id",
        )  # fmt: skip
    if user or by == "user":
        table, since = "model_usage_user_daily", day_since
    elif tenant:
        table, since = "model_usage_hourly", "hour >= $1"
        if by == "day":
            key = day_of.format("hour")
    else:
        table, since = "model_usage_daily_totals", day_since
    return _Source(
        table, since, key, "sum(requests)::bigint", "cost_usd", _ROLLUP_ERRORS, "user_id"
    )


def report_sql(by: Grouping, *, tenant: bool, user: bool) -> str:
    """The query for a report; ``$1`` since, then ``$2`` tenant and ``$3`` user when given."""
    if by not in GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(GROUPINGS)}")
    if (user or by == "user") and not tenant:
        raise ValueError("a report on users needs the tenant (user ids are per tenant)")
    src = _source(by, tenant, user)
    where = src.since
    if tenant:
        where += " AND tenant_id = $2"
    if user:
        where += f" AND {src.user} = $3"
    order = "1" if by == "day" else "cost_usd DESC NULLS LAST, 1"
    return (
        f"SELECT {src.key} AS key, {src.requests} AS requests,"
        " sum(input_tokens)::bigint AS input_tokens, sum(output_tokens)::bigint AS output_tokens,"
        f" sum({src.cost}) AS cost_usd, coalesce(sum({src.errors}), 0)::bigint AS errors"
        f" FROM {src.table} WHERE {where} GROUP BY 1 ORDER BY {order}"
    )


def daily_sql(by: Literal["provider", "model"], *, tenant: bool, user: bool) -> str:
    """Cost and requests per UTC day and provider (or model), from the rollup :func:`report_sql`
    reads for the same scope; ``$1`` since, then ``$2`` tenant and ``$3`` user when given."""
    if user and not tenant:
        raise ValueError("a report on users needs the tenant (user ids are per tenant)")
    src = _source(by, tenant, user)
    day = "((hour AT TIME ZONE 'UTC')::date)" if src.table == "model_usage_hourly" else "day"
    where = src.since
    if tenant:
        where += " AND tenant_id = $2"
    if user:
        where += f" AND {src.user} = $3"
    return (
        f"SELECT {day} AS day, {src.key} AS key, sum({src.cost}) AS cost_usd,"
        f" {src.requests} AS requests FROM {src.table} WHERE {where}"
        " GROUP BY 1, 2 ORDER BY 1, 2"
    )


def report_args(
    since: datetime, tenant_id: uuid.UUID | str | None, user_id: str | None
) -> list[object]:
    """The arguments of :func:`report_sql` and :func:`daily_sql`."""
    args: list[object] = [since]
    if tenant_id is not None:
        args.append(uuid.UUID(str(tenant_id)))
    if user_id is not None:
        args.append(user_id)
    return args


async def usage_report(
    pool: asyncpg.Pool[asyncpg.Record],
    *,
    since: datetime,
    by: Grouping = "day",
    tenant_id: uuid.UUID | str | None = None,
    user_id: str | None = None,
) -> list[ReportRow]:
    """Requests, tokens, cost and errors per group since ``since``."""
    sql = report_sql(by, tenant=tenant_id is not None, user=user_id is not None)
    rows = await pool.fetch(sql, *report_args(since, tenant_id, user_id))
    return [
        ReportRow(
            key=r["key"],
            requests=r["requests"],
            input_tokens=r["input_tokens"] or 0,
            output_tokens=r["output_tokens"] or 0,
            cost_usd=r["cost_usd"] or Decimal(0),
            errors=r["errors"],
        )
        for r in rows
    ]
