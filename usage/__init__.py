"""Usage accounting: every attempt that reaches a provider becomes one ``model_usage_stats`` row.

``ModelUsageTracker.record()`` queues a row in microseconds; one writer task batches rows into
PostgreSQL, and a local spool keeps them through outages and restarts. ``calculate_cost`` and
``PriceBook`` price rows from the shipped table and the ``model_prices`` overrides.
"""

from __future__ import annotations

from .ids import new_usage_id
from .pricing import PRICE_TABLE_VERSION, Price, PriceBook, calculate_cost, default_price_book
from .record import COLUMNS, UsageRecord
from .scope import tenant_scope
from .shared import close_usage_tracker, get_usage_tracker, track_usage
from .spool import default_spool_dir
from .stats import (
    DEFAULT_RATE_LIMITS,
    ModelUsage,
    RateLimits,
    RateLimitState,
    RateLimitStatus,
    TenantUsageStats,
    UsageBacklog,
)
from .tracker import ModelUsageTracker

__all__ = [
    "COLUMNS",
    "DEFAULT_RATE_LIMITS",
    "PRICE_TABLE_VERSION",
    "ModelUsage",
    "ModelUsageTracker",
    "Price",
    "PriceBook",
    "RateLimitState",
    "RateLimitStatus",
    "RateLimits",
    "TenantUsageStats",
    "UsageBacklog",
    "UsageRecord",
    "calculate_cost",
    "close_usage_tracker",
    "default_price_book",
    "default_spool_dir",
    "get_usage_tracker",
    "new_usage_id",
    "tenant_scope",
    "track_usage",
]
