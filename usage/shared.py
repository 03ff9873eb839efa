"""The process-wide tracker: ``get_usage_tracker()``, ``track_usage()``, ``close_usage_tracker()``.

It connects to ``$DATABASE_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``)
and spools to ``$LLM_GATEWAY_SPOOL_DIR`` (default ``~/.cache/llm-gateway/spool``). Add
``await close_usage_tracker()`` to the service's shutdown.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from .stats import UsageBacklog
from .tracker import ModelUsageTracker, _env_dsn

__all__ = ["close_usage_tracker", "get_usage_tracker", "track_usage"]

_shared: ModelUsageTracker | None = None
_shared_loop: asyncio.AbstractEventLoop | None = None
_shared_lock: asyncio.Lock | None = None


async def get_usage_tracker() -> ModelUsageTracker:
    """The process-wide tracker for ``$DATABASE_URL``, started on first use.

    Concurrent first calls make one tracker. It belongs to the running event loop; a call
    from another loop (the first one was closed) makes a new one.
    """
    global _shared, _shared_loop, _shared_lock
    loop = asyncio.get_running_loop()
    if _shared is not None and _shared_loop is loop:
        return _shared
    if _shared_lock is None or _shared_loop is not loop:
        _shared_lock, _shared_loop, _shared = asyncio.Lock(), loop, None
    async with _shared_lock:
        if _shared is None:
            tracker = ModelUsageTracker(_env_dsn())
            await tracker.start()
            _shared = tracker
        return _shared


async def close_usage_tracker(timeout: float = 10.0) -> UsageBacklog | None:
    """Close the process-wide tracker, if one was made (add this to the service's shutdown)."""
    global _shared
    tracker, _shared = _shared, None
    return None if tracker is None else await tracker.close(timeout)


async def track_usage(
    tenant_id: uuid.UUID | str,
    provider: str,
    model_name: str,
    endpoint: str,
    **kwargs: Any,
) -> uuid.UUID:
    """Queue a usage row on the process-wide tracker; returns its id without waiting.

    ``kwargs`` are those of :meth:`ModelUsageTracker.make_record` (``latency_ms`` is required).
    """
    tracker = await get_usage_tracker()
    return await tracker.track_request(
        tenant_id=tenant_id, provider=provider, model_name=model_name, endpoint=endpoint, **kwargs
    )
