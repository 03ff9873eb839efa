"""Budget alerts: a ``budget_events`` row, a NOTIFY and a callback, once per period everywhere."""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

if TYPE_CHECKING:
    from .ledger import Lease

__all__ = ["AlertSink", "BudgetEventCallback", "check_alerts"]

log = logging.getLogger("llm_gateway.governance")

BudgetEventCallback = Callable[[dict[str, Any]], Awaitable[None] | None]
CHANNEL = "llm_gateway_events"

# Inserted and announced in one statement: only the process whose insert wins notifies.
_FIRE = """
WITH ins AS (
    INSERT INTO budget_events
        (tenant_id, scope, user_id, period_start, threshold, spent_usd, max_usd)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
    ON CONFLICT (tenant_id, scope, (coalesce(user_id, '')), period_start, threshold) DO NOTHING
    RETURNING tenant_id, scope, user_id, period_start, threshold, spent_usd, max_usd, created_at
), payload AS (
    SELECT json_build_object(
        'type', 'budget_alert', 'tenant_id', tenant_id, 'scope', scope, 'user_id', user_id,
        'period_start', period_start, 'threshold', threshold, 'spent_usd', spent_usd,
        'max_usd', max_usd, 'created_at', created_at)::text AS body
    FROM ins
)
SELECT body, pg_notify('llm_gateway_events', body) FROM payload
"""


class AlertSink:
    """Fires budget alerts in the background; never raises into a request."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        callback: BudgetEventCallback | None = None,
        *,
        timeout: float = 5.0,
    ) -> None:
        self._pool = pool
        self._callback = callback
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self.fired = 0

    def fire(
        self,
        *,
        tenant_id: uuid.UUID,
        scope: str,
        user_id: str | None,
        period_start: datetime,
        threshold: float,
        spent_usd: float,
        max_usd: float,
    ) -> None:
        args = (tenant_id, scope, user_id, period_start, threshold, spent_usd, max_usd)
        task = asyncio.get_running_loop().create_task(self._fire(args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fire(self, args: tuple[Any, ...]) -> None:
        try:
            async with self._pool().acquire(timeout=self._timeout) as conn:
                row = await conn.fetchrow(_FIRE, *args, timeout=self._timeout)
        except Exception as exc:  # an alert must never break serving
            log.warning("budget alert not recorded: %s", type(exc).__name__)
            return
        if row is None:
            return  # another process fired it
        self.fired += 1
        event = orjson.loads(row["body"])
        log.info("budget alert: tenant %s %s at %s", args[0], args[1], args[4])
        if self._callback is None:
            return
        try:
            result = self._callback(event)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_budget_event callback failed")

    async def drain(self) -> None:
        """Wait for alerts being fired (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def check_alerts(sink: AlertSink | None, lease: Lease, spent: float, refused: bool = False) -> None:
    """Fire each threshold of a budget lease the spend reached (1.0 also on the first refusal),
    once per period in this process (the ``budget_events`` key makes it once everywhere).
    A virtual key's alert (scope ``"key"``) carries the key's id as its ``user_id``."""
    spec, bounds = lease.spec, lease.bounds
    if sink is None or bounds is None or spec.allowed <= 0:
        return
    for threshold in spec.alert_at:
        reached = spent >= threshold * spec.allowed or (refused and threshold == 1.0)
        if reached and threshold not in lease.alerted:
            lease.alerted.add(threshold)
            sink.fire(
                tenant_id=spec.tenant_id,
                scope=spec.scope,
                user_id=spec.user_id if spec.key_id is None else spec.key_id,
                period_start=bounds.start,
                threshold=threshold,
                spent_usd=spent,
                max_usd=spec.allowed,
            )
    lease.alert_floor = min(
        (t * spec.allowed for t in spec.alert_at if t not in lease.alerted),
        default=float("inf"),
    )
