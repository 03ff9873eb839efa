"""Monthly usage per tenant (and per user) with the breakdown by provider and model.

Served from the rollups: ``model_usage_hourly`` for a tenant, ``model_usage_user_daily`` for
one user. Both are recomputed by ``llm_gateway_maintain_usage()`` every few minutes, so the
last minutes may be missing until its next run. Months are UTC.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import asyncpg

__all__ = ["ModelMonth", "MonthlyUsage", "get_monthly_usage", "parse_month"]

_MONTH_RE: Final = re.compile(r"(\d{4})-(\d{2})")

# Month bounds as UTC instants, so the range predicate uses the rollups' indexes.
_TENANT_SQL: Final = """
SELECT provider, model_name,
       sum(requests)::bigint AS requests,
       sum(input_tokens)::bigint AS input_tokens,
       sum(output_tokens)::bigint AS output_tokens,
       sum(cost_usd) AS cost_usd,
       coalesce(sum(requests) FILTER (WHERE status <> 'success'), 0)::bigint AS errors,
       sum(unpriced_requests)::bigint AS unpriced_requests
FROM model_usage_hourly
WHERE tenant_id = $1
  AND hour >= $2::date::timestamp AT TIME ZONE 'UTC'
  AND hour < $3::date::timestamp AT TIME ZONE 'UTC'
GROUP BY provider, model_name
ORDER BY sum(cost_usd) DESC NULLS LAST, provider, model_name
"""

_USER_SQL: Final = """
SELECT provider, model_name,
       sum(requests)::bigint AS requests,
       sum(input_tokens)::bigint AS input_tokens,
       sum(output_tokens)::bigint AS output_tokens,
       sum(cost_usd) AS cost_usd,
       coalesce(sum(requests) FILTER (WHERE status <> 'success'), 0)::bigint AS errors,
       sum(unpriced_requests)::bigint AS unpriced_requests
FROM model_usage_user_daily
WHERE tenant_id = $1 AND user_id = $4 AND day >= $2::date AND day < $3::date
GROUP BY provider, model_name
ORDER BY sum(cost_usd) DESC NULLS LAST, provider, model_name
"""


@dataclass(frozen=True, slots=True)
class ModelMonth:
    """One provider and model in the month. ``cost_usd`` sums priced rows only
    (``unpriced_requests`` had no known price); ``errors`` are attempts not ``success``."""

    provider: str
    model_name: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    errors: int
    unpriced_requests: int


@dataclass(frozen=True, slots=True)
class MonthlyUsage:
    """A tenant's (or one user's) usage in one UTC month, with totals and the breakdown."""

    tenant_id: uuid.UUID
    month: date  # the first day
    user_id: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    errors: int
    unpriced_requests: int
    by_model: tuple[ModelMonth, ...]


def parse_month(month: str | date | None, *, now: datetime | None = None) -> date:
    """The first day of ``month`` (``"YYYY-MM"``, a date, or ``None`` = the current UTC month)."""
    if month is None:
        today = (now or datetime.now(UTC)).astimezone(UTC)
        return date(today.year, today.month, 1)
    if isinstance(month, datetime):
        month = month.astimezone(UTC).date() if month.tzinfo else month.date()
    if isinstance(month, date):
        return date(month.year, month.month, 1)
    if isinstance(month, str):
        found = _MONTH_RE.fullmatch(month.strip())
        if found and 1 <= int(found[2]) <= 12:
            return date(int(found[1]), int(found[2]), 1)
    raise ValueError(f"month must be 'YYYY-MM' or a date, not {month!r}")


def _next_month(first: date) -> date:
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)


async def get_monthly_usage(
    pool: asyncpg.Pool[asyncpg.Record],
    tenant_id: uuid.UUID | str,
    month: str | date | None = None,
    user_id: str | None = None,
) -> MonthlyUsage:
    """Usage of ``tenant_id`` (or of its ``user_id``) in ``month``, per provider and model."""
    tid = tenant_id if isinstance(tenant_id, uuid.UUID) else uuid.UUID(str(tenant_id))
    first = parse_month(month)
    end = _next_month(first)
    if user_id is None:
        rows = await pool.fetch(_TENANT_SQL, tid, first, end)
    else:
        rows = await pool.fetch(_USER_SQL, tid, first, end, user_id)
    by_model = tuple(
        ModelMonth(
            provider=r["provider"],
            model_name=r["model_name"],
            requests=r["requests"],
            input_tokens=r["input_tokens"] or 0,
            output_tokens=r["output_tokens"] or 0,
            cost_usd=r["cost_usd"] or Decimal(0),
            errors=r["errors"],
            unpriced_requests=r["unpriced_requests"],
        )
        for r in rows
    )
    return MonthlyUsage(
        tenant_id=tid,
        month=first,
        user_id=user_id,
        requests=sum(m.requests for m in by_model),
        input_tokens=sum(m.input_tokens for m in by_model),
        output_tokens=sum(m.output_tokens for m in by_model),
        cost_usd=sum((m.cost_usd for m in by_model), Decimal(0)),
        errors=sum(m.errors for m in by_model),
        unpriced_requests=sum(m.unpriced_requests for m in by_model),
        by_model=by_model,
    )
