"""Refusals of admission control."""

from __future__ import annotations

from datetime import datetime

from ..errors import GatewayError

__all__ = ["BudgetExceededError", "QuotaExceededError"]


class QuotaExceededError(GatewayError):
    """A budget or rate limit refused the request before any provider was contacted.

    ``scope``: ``"tenant"``, ``"user"``, ``"system_keys"`` or a provider name. ``limit``: the
    config key (``"max_usd"``, ``"requests_per_minute"``, ...). ``retry_after``: seconds until
    the request could be admitted (a rate: until the window has room; a budget: until its
    period resets), ``resets_at`` the same as a UTC datetime.
    """

    outcome = "quota_exceeded"

    def __init__(
        self,
        *,
        scope: str,
        limit: str,
        used: float,
        allowed: float,
        retry_after: float,
        resets_at: datetime,
        detail: str = "",
    ) -> None:
        self.scope = scope
        self.limit = limit
        self.used = used
        self.allowed = allowed
        self.retry_after = retry_after
        self.resets_at = resets_at
        unit = "USD" if limit == "max_usd" else ""
        amount = f"{used:.6g}/{allowed:.6g}{' ' + unit if unit else ''}"
        extra = f"; {detail}" if detail else ""
        super().__init__(
            f"{scope} quota exceeded: {limit} {amount}; retry after {retry_after:.3g}s"
            f" ({resets_at.isoformat()}){extra}"
        )


class BudgetExceededError(QuotaExceededError):
    """A spending cap (``max_usd``) refused the request."""
