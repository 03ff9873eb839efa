"""Model-switch recommendations per tenant and endpoint, from the ledger's last 30 days.

For each endpoint and model a tenant uses: cost per 1,000 requests, success rate, p50/p95
latency (successful attempts, from a histogram: within 7.5 %), and the cheaper models it could
switch to. Read from the daily rollups (``model_usage_endpoint_daily``,
``model_usage_latency_daily``; on a database upgraded to 009 with rows, complete once the
back-fill is: :mod:`usage.analytics.backfill`), so the window starts at the UTC day ``days``
back. A candidate model must be:

* usable by the tenant: the caller passes the candidates (:class:`CandidateModel`), e.g. from
  :func:`usage.analytics.candidates.tenant_candidates`, which reads the tenant's keys and the
  router's provider settings (``usage`` cannot import ``llm_gateway`` at module level);
* priced: a model without a known price in the price book is never recommended;
* big enough: a known context window holding the largest prompt plus answer the endpoint
  sent in the window (an unknown window is not assumed to fit);
* at least as reliable: its success rate (the tenant's own with at least ``min_attempts``
  attempts, else all tenants' from the daily totals) is not below the current model's. With
  no data anywhere the candidate is still listed, marked ``success_basis = "none"``.

The saving replays the endpoint's real token mix (input and output tokens of its successful
attempts in the window) at the candidate's price, against what it actually cost. Token counts
differ between tokenizers, so it is an estimate.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    import asyncpg

    from ..pricing import PriceBook

__all__ = [
    "CandidateModel",
    "ModelInUse",
    "Recommendation",
    "recommend_models",
]

_MILLION: Final = Decimal(1_000_000)

# From the daily rollups of migration 009 (the window starts at the UTC day of ``since``):
# per endpoint and model, and the latency histogram of successful attempts (buckets 15 % wide:
# a percentile is the geometric middle of its bucket, within 7.5 % of the exact value).
_IN_USE_SQL: Final = """
WITH uses AS (
    SELECT endpoint, provider, model_name,
           sum(requests)::bigint AS requests,
           sum(successes)::bigint AS successes,
           sum(cost_usd) AS cost_usd,
           sum(unpriced_requests)::bigint AS unpriced,
           sum(ok_input_tokens)::bigint AS input_tokens,
           sum(ok_output_tokens)::bigint AS output_tokens,
           coalesce(max(max_total_tokens), 0) AS max_tokens
    FROM model_usage_endpoint_daily
    WHERE tenant_id = $1 AND day >= $2::date
    GROUP BY 1, 2, 3
),
buckets AS (
    SELECT endpoint, provider, model_name, bucket, sum(successes) AS n
    FROM model_usage_latency_daily
    WHERE tenant_id = $1 AND day >= $2::date
    GROUP BY 1, 2, 3, 4
),
cumulative AS (
    SELECT endpoint, provider, model_name, bucket,
           sum(n) OVER (PARTITION BY endpoint, provider, model_name ORDER BY bucket) AS upto,
           sum(n) OVER (PARTITION BY endpoint, provider, model_name) AS total
    FROM buckets
),
percentiles AS (
    SELECT endpoint, provider, model_name,
           min(bucket) FILTER (WHERE upto >= 0.5 * total) AS b50,
           min(bucket) FILTER (WHERE upto >= 0.95 * total) AS b95
    FROM cumulative
    GROUP BY 1, 2, 3
)
SELECT u.*, power(1.15, p.b50 + 0.5)::float8 AS p50_ms, power(1.15, p.b95 + 0.5)::float8 AS p95_ms
FROM uses u
LEFT JOIN percentiles p USING (endpoint, provider, model_name)
ORDER BY u.endpoint, CASE WHEN u.unpriced < u.requests THEN u.cost_usd END DESC NULLS LAST,
         u.provider, u.model_name
"""

# Success rates per provider and model: the tenant's (endpoint rollup), all tenants' (daily).
_TENANT_RATES_SQL: Final = """
SELECT provider, model_name, sum(requests)::bigint AS requests,
       sum(successes)::bigint AS successes
FROM model_usage_endpoint_daily
WHERE tenant_id = $1 AND day >= $2::date
GROUP BY 1, 2
"""
_GLOBAL_RATES_SQL: Final = """
SELECT provider, model_name, sum(requests)::bigint AS requests,
       coalesce(sum(requests) FILTER (WHERE status = 'success'), 0)::bigint AS successes
FROM model_usage_daily_totals
WHERE day >= $1::date
GROUP BY 1, 2
"""


@dataclass(frozen=True, slots=True)
class CandidateModel:
    """A model the tenant can call (it has a key or may use a system key)."""

    provider: str
    model: str
    context_window: int | None


@dataclass(frozen=True, slots=True)
class ModelInUse:
    """One model as an endpoint of the tenant used it in the window."""

    endpoint: str
    provider: str
    model_name: str
    requests: int
    success_rate: float
    cost_usd: Decimal
    cost_per_1k_requests: Decimal
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    input_tokens: int
    output_tokens: int
    max_tokens: int
    unpriced_requests: int


@dataclass(frozen=True, slots=True)
class Recommendation:
    """Switch ``current`` to ``provider``/``model``: ``monthly_saving_usd`` over 30 days."""

    current: ModelInUse
    provider: str
    model: str
    context_window: int
    projected_cost_usd: Decimal
    monthly_saving_usd: Decimal
    success_rate: float | None
    success_basis: Literal["tenant", "all_tenants", "none"]


def _rates(rows: Sequence[asyncpg.Record]) -> dict[tuple[str, str], tuple[int, int]]:
    return {(r["provider"], r["model_name"]): (r["requests"], r["successes"]) for r in rows}


async def recommend_models(
    pool: asyncpg.Pool[asyncpg.Record],
    prices: PriceBook,
    tenant_id: uuid.UUID | str,
    candidates: Sequence[CandidateModel],
    *,
    days: int = 30,
    min_attempts: int = 20,
    now: datetime | None = None,
) -> tuple[list[ModelInUse], list[Recommendation]]:
    """The models in use per endpoint (dearest first), and the cheaper candidates: best saving
    first, equal savings (in cents) by endpoint, current model and candidate."""
    tid = tenant_id if isinstance(tenant_id, uuid.UUID) else uuid.UUID(str(tenant_id))
    since = (now or datetime.now(UTC)) - timedelta(days=days)
    async with pool.acquire() as conn:
        first_day = since.astimezone(UTC).date()
        in_use_rows = await conn.fetch(_IN_USE_SQL, tid, first_day)
        tenant_rates = _rates(await conn.fetch(_TENANT_RATES_SQL, tid, first_day))
        global_rates = _rates(await conn.fetch(_GLOBAL_RATES_SQL, since.date()))
    in_use = [
        ModelInUse(
            endpoint=r["endpoint"],
            provider=r["provider"],
            model_name=r["model_name"],
            requests=r["requests"],
            success_rate=r["successes"] / r["requests"],
            cost_usd=r["cost_usd"],
            cost_per_1k_requests=(r["cost_usd"] * 1000 / r["requests"]).quantize(Decimal("0.0001")),
            p50_latency_ms=r["p50_ms"],
            p95_latency_ms=r["p95_ms"],
            input_tokens=int(r["input_tokens"]),
            output_tokens=int(r["output_tokens"]),
            max_tokens=r["max_tokens"],
            unpriced_requests=r["unpriced"],
        )
        for r in in_use_rows
    ]

    def success(provider: str, model: str) -> tuple[float | None, str]:
        for basis, table in (("tenant", tenant_rates), ("all_tenants", global_rates)):
            requests, ok = table.get((provider, model), (0, 0))
            if requests >= min_attempts:
                return ok / requests, basis
        return None, "none"

    found: list[Recommendation] = []
    for use in in_use:
        if use.unpriced_requests:  # what it costs now is unknown: no saving can be computed
            continue
        current_rate, _ = success(use.provider, use.model_name)
        for cand in candidates:
            if (cand.provider, cand.model) == (use.provider, use.model_name):
                continue
            if cand.context_window is None or use.max_tokens > cand.context_window:
                continue
            price = prices.lookup(cand.provider, cand.model)
            if price is None:
                continue
            rate, basis = success(cand.provider, cand.model)
            if rate is not None and current_rate is not None and rate < current_rate:
                continue
            projected = (
                price.input_per_m * use.input_tokens + price.output_per_m * use.output_tokens
            ) / _MILLION
            # Scale the window to 30 days, the "monthly" of the saving.
            saving = (use.cost_usd - projected) * Decimal(30) / Decimal(days)
            if saving <= 0:
                continue
            found.append(
                Recommendation(
                    current=use,
                    provider=cand.provider,
                    model=cand.model,
                    context_window=cand.context_window,
                    projected_cost_usd=projected.quantize(Decimal("0.000001")),
                    monthly_saving_usd=saving.quantize(Decimal("0.01")),
                    success_rate=rate,
                    success_basis=basis,  # type: ignore[arg-type]
                )
            )
    # Savings are rounded to cents, so equal ones are common: then by endpoint and names.
    found.sort(
        key=lambda r: (
            -r.monthly_saving_usd, r.current.endpoint, r.current.provider, r.current.model_name,
            r.provider, r.model,
        )
    )  # fmt: skip
    return in_use, found
