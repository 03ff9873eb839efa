"""The tracker's read side: stats and analytics queries on its pool, as tracker methods.

:class:`UsageQueries` is a base of :class:`~usage.ModelUsageTracker`: each method runs one query
of :mod:`usage.stats` or :mod:`usage.analytics` on the tracker's pool (started trackers only).
The analytics modules are imported on first use.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg

from .stats import (
    RateLimitStatus,
    TenantUsageStats,
    check_rate_limit_status,
    get_tenant_usage_stats,
)

if TYPE_CHECKING:
    from .analytics.anomalies import Anomaly
    from .analytics.monthly import MonthlyUsage
    from .analytics.recommend import CandidateModel, ModelInUse, Recommendation
    from .connection import WriterLink
    from .pricing import PriceBook

__all__ = ["UsageQueries"]


class UsageQueries:
    """Stats and analytics methods of :class:`~usage.ModelUsageTracker`."""

    # Set by UsagePipeline, the tracker's other base.
    _link: WriterLink
    _prices: PriceBook

    async def get_tenant_usage_stats(
        self, tenant_id: uuid.UUID | str, hours: float = 24
    ) -> TenantUsageStats:
        """Per provider and model over the last ``hours`` (see :mod:`usage.stats`)."""
        return await get_tenant_usage_stats(self._require_pool(), tenant_id, hours)

    async def check_rate_limit_status(
        self, tenant_id: uuid.UUID | str, provider: str
    ) -> RateLimitStatus:
        """Last-minute and last-day use against the tenant's limits (see :mod:`usage.stats`)."""
        return await check_rate_limit_status(self._require_pool(), tenant_id, provider)

    async def get_monthly_usage(
        self,
        tenant_id: uuid.UUID | str,
        month: str | date | None = None,
        user_id: str | None = None,
    ) -> MonthlyUsage:
        """A tenant's (or one user's) usage in a UTC month (see :mod:`usage.analytics.monthly`)."""
        from .analytics.monthly import get_monthly_usage

        return await get_monthly_usage(self._require_pool(), tenant_id, month, user_id)

    async def detect_anomalies(
        self,
        *,
        since: datetime | timedelta = timedelta(hours=24),
        tenant_id: uuid.UUID | str | None = None,
        min_score: float = 4.0,
        now: datetime | None = None,
    ) -> list[Anomaly]:
        """Hourly anomalies per tenant in the complete hours since ``since`` (an instant or a
        span back from ``now``, default the database's clock); see
        :mod:`usage.analytics.anomalies`."""
        from .analytics.anomalies import detect_anomalies

        return await detect_anomalies(
            self._require_pool(), since=since, tenant_id=tenant_id, min_score=min_score, now=now
        )

    async def recommend_models(
        self,
        tenant_id: uuid.UUID | str,
        candidates: Sequence[CandidateModel] | None = None,
        *,
        days: int = 30,
    ) -> tuple[list[ModelInUse], list[Recommendation]]:
        """Models in use and cheaper ones to switch to (see :mod:`usage.analytics.recommend`).

        ``candidates`` default to the models the tenant's keys reach with the provider
        settings from the environment (:func:`usage.analytics.candidates.tenant_candidates`).
        """
        from .analytics.candidates import tenant_candidates
        from .analytics.recommend import recommend_models

        pool = self._require_pool()
        if candidates is None:
            candidates = await tenant_candidates(pool, tenant_id)
        return await recommend_models(pool, self._prices, tenant_id, candidates, days=days)

    def _require_pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._link.pool is None:
            raise RuntimeError("the tracker is not started")
        return self._link.pool
