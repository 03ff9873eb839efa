"""Hourly anomalies per tenant: cost, requests and error rate against its own baseline.

The detector is ``llm_gateway_usage_anomalies()`` (migrations 008, 009, 012), so Python, psql
(``sql/monitoring/usage_anomalies.sql``) and the CLI give the same answer. Maintenance stores
the scores of each complete hour it refreshes; the function reads them for the hours they
cover and computes the others (same numbers, slower). In short: each
complete UTC hour is compared with the same hour of the week over the previous four weeks
(median and MAD, an hour without rows counting as zero); tenants younger than two weeks fall
back to the same hour on the previous days. The README ("Usage analytics") gives the scales,
the floors and the noise it tolerates.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    import asyncpg

__all__ = ["DEFAULT_MIN_SCORE", "Anomaly", "detect_anomalies"]

DEFAULT_MIN_SCORE: Final = 4.0

_SQL: Final = """
SELECT tenant_id, hour, metric, observed, expected, score
FROM llm_gateway_usage_anomalies($1, $2, $3, $4, $5)
"""

Metric = Literal["requests", "cost", "error_rate"]


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One tenant's metric in one UTC hour, far from its baseline.

    ``observed``/``expected``: requests, USD or error rate (0..1); ``score``: the distance in
    robust standard deviations (see the module docstring).
    """

    tenant_id: uuid.UUID
    hour: datetime
    metric: Metric
    observed: float
    expected: float
    score: float


async def detect_anomalies(
    pool: asyncpg.Pool[asyncpg.Record],
    *,
    since: datetime | timedelta = timedelta(hours=24),
    tenant_id: uuid.UUID | str | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
    min_requests: float = 5.0,
    now: datetime | None = None,
) -> list[Anomaly]:
    """Anomalies in the complete hours from ``since`` (an instant, or a span back from now).

    ``now`` (default: the database's clock) fixes "the current hour", which is not scored.
    """
    clock = now if now is not None else datetime.now(UTC)
    start = clock - since if isinstance(since, timedelta) else since
    if start.tzinfo is None:
        raise ValueError("since must be timezone-aware (or a timedelta)")
    tid = None if tenant_id is None else uuid.UUID(str(tenant_id))
    rows = await pool.fetch(_SQL, start, tid, min_score, min_requests, now)
    return [
        Anomaly(
            tenant_id=r["tenant_id"],
            hour=r["hour"],
            metric=r["metric"],
            observed=r["observed"],
            expected=r["expected"],
            score=r["score"],
        )
        for r in rows
    ]
