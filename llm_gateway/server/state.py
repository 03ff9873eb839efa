"""The gateway's shared objects (router, key store, pool) and their life: start, graceful close.

One :class:`Gateway` per worker process. It keeps nothing another worker needs: configs,
limits and key revocations reach every worker through PostgreSQL (leases, NOTIFY), as in
the SDK.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import asyncpg

from ..dsn import create_pool_checked
from .errors import ApiError
from .request import DEFAULT_MAX_BODY_BYTES, bearer_key

if TYPE_CHECKING:
    from ..router import TenantLLMRouter
    from .virtual_keys import VirtualKey, VirtualKeyStore

__all__ = ["DEFAULT_SHUTDOWN_TIMEOUT", "Gateway"]

log = logging.getLogger("llm_gateway.server")

DEFAULT_SHUTDOWN_TIMEOUT = 30.0
"""Seconds in-flight requests get to finish after SIGTERM (then the usage queue drains)."""

_KEY_MESSAGES: Mapping[str, str] = {
    "revoked": "this API key has been revoked",
    "expired": "this API key has expired",
    "malformed": "invalid API key",
    "unknown": "invalid API key",
}

# What a failing database raises below our own error types.
_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class Gateway:
    """What the request handlers share. Objects passed in are started here but closed by
    their owner; objects made here (from ``dsn``) are closed by :meth:`close`."""

    def __init__(
        self,
        router: TenantLLMRouter,
        keys: VirtualKeyStore | None,
        *,
        pool: asyncpg.Pool | None = None,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        readiness_timeout: float = 2.0,
        metrics_registry: Any = None,
        owns_router: bool = False,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.router = router
        self.max_body_bytes = max_body_bytes
        self._keys = keys
        self._owns_keys = keys is None
        self._pool = pool
        self._owns_pool = pool is None
        self.shutdown_timeout = shutdown_timeout
        self.readiness_timeout = readiness_timeout
        self.metrics_registry = metrics_registry
        self._owns_router = owns_router

    @property
    def keys(self) -> VirtualKeyStore:
        assert self._keys is not None, "gateway not started"
        return self._keys

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "gateway not started"
        return self._pool

    async def start(self) -> None:
        """Start the router, the pool (key store and readiness) and the key store."""
        await self.router.start()
        if self._pool is None:
            self._pool = await create_pool_checked(
                self.router.dsn,
                self.router.connect_timeout,
                check="dsn= or DATABASE_URL",
                min_size=1,
                max_size=4,
            )
        if self._keys is None:
            from .virtual_keys import VirtualKeyStore

            self._keys = VirtualKeyStore(self._pool)
        await self._keys.start()

    async def close(self) -> None:
        """Drain and close what this gateway made. The HTTP server has already let in-flight
        requests end (uvicorn's graceful timeout); ``router.close`` then waits at most
        ``shutdown_timeout`` more for any left, and writes (or spools) the usage queue."""
        if self._owns_router:
            await self.router.close(timeout=self.shutdown_timeout)
        if self._keys is not None and self._owns_keys:
            await self._keys.close()
        if self._pool is not None and self._owns_pool:
            await self._pool.close()

    async def authenticate(self, headers: Mapping[str, str]) -> VirtualKey:
        """The virtual key of ``Authorization: Bearer``, or a 401 (503 if the database is
        down). The message never contains the key."""
        from .virtual_keys import VirtualKeyError

        raw = bearer_key(headers)
        try:
            return await self.keys.authenticate(raw)
        except VirtualKeyError as exc:
            message = _KEY_MESSAGES.get(exc.reason, "invalid API key")
            raise ApiError(401, message, code="invalid_api_key") from None
        except _DB_ERRORS as exc:
            log.warning("key lookup failed: %s", type(exc).__name__)
            raise ApiError(503, "the gateway's database is unavailable", type="api_error") from None

    async def database_ok(self) -> str | None:
        """``None`` when PostgreSQL answers within ``readiness_timeout``, else why not."""
        try:
            async with asyncio.timeout(self.readiness_timeout):
                await self.pool.fetchval("SELECT 1")
        except (*_DB_ERRORS, AssertionError) as exc:
            return type(exc).__name__
        return None
