"""The process-wide router, for services that call module-level functions."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .router import TenantLLMRouter
from .streaming import CompletionStream
from .types import CompletionResult, TaskType

__all__ = ["close_tenant_router", "complete_for_tenant", "get_tenant_router", "stream_for_tenant"]

_router: TenantLLMRouter | None = None
_loop: asyncio.AbstractEventLoop | None = None
_lock: asyncio.Lock | None = None


async def get_tenant_router() -> TenantLLMRouter:
    """The process-wide router (``DATABASE_URL``, providers from the environment), started.

    Concurrent first calls share one router. Close it at shutdown with
    :func:`close_tenant_router` so queued usage rows are written. The router belongs to the
    running event loop; a call from another loop (the first one ended) makes a new one.
    """
    global _router, _loop, _lock
    loop = asyncio.get_running_loop()
    if _router is not None and _loop is loop:
        return _router
    if _lock is None or _loop is not loop:
        # The old loop's router, pool and lock cannot be used (or closed) from this loop.
        _lock, _loop, _router = asyncio.Lock(), loop, None
    async with _lock:
        if _router is None:
            router = TenantLLMRouter()
            await router.start()
            _router = router
    return _router


async def close_tenant_router(timeout: float = 30.0) -> None:
    """Close the process-wide router, draining its usage rows; a later call makes a new one.

    Requests in flight get ``timeout`` seconds to end (see :meth:`TenantLLMRouter.close`).
    A router made in another event loop (one that has ended) is only forgotten: its pool and
    clients cannot be closed from this loop.
    """
    global _router
    router, _router = _router, None
    if router is not None and _loop is asyncio.get_running_loop():
        await router.close(timeout)


async def complete_for_tenant(
    tenant_id: uuid.UUID | str,
    messages: Sequence[Mapping[str, Any]],
    task_type: TaskType = TaskType.CHAT,
    estimated_tokens: int = 100,
    endpoint: str = "/api/chat",
    user_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    **params: Any,
) -> CompletionResult:
    """:meth:`TenantLLMRouter.complete_for_tenant` on the process-wide router."""
    router = await get_tenant_router()
    return await router.complete_for_tenant(
        tenant_id, messages, task_type, estimated_tokens, endpoint, user_id, metadata, **params
    )


async def stream_for_tenant(
    tenant_id: uuid.UUID | str,
    messages: Sequence[Mapping[str, Any]],
    task_type: TaskType = TaskType.CHAT,
    estimated_tokens: int = 100,
    endpoint: str = "/api/chat",
    user_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    **params: Any,
) -> CompletionStream:
    """:meth:`TenantLLMRouter.stream_for_tenant` on the process-wide router."""
    router = await get_tenant_router()
    return await router.stream_for_tenant(
        tenant_id, messages, task_type, estimated_tokens, endpoint, user_id, metadata, **params
    )
