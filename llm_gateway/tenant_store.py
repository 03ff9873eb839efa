"""Loads tenant configuration from PostgreSQL into a TTL cache, one query per miss."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

import asyncpg
from cachetools import TTLCache

from .config import InferenceConfig, TenantConfig, parse_tenant_config
from .errors import ConfigUnavailableError, GatewayError, TenantNotFoundError

__all__ = ["TenantConfigStore", "UnknownTenantPolicy", "as_tenant_id"]

UnknownTenantPolicy = Literal["error", "system_defaults"]
T = TypeVar("T")
log = logging.getLogger("llm_gateway")

# As text, so the JSON is parsed in one place whatever codecs the pool has: a JSON *string*
# (double-encoded config) must stay distinguishable from an object.
_QUERY = (
    "SELECT name, llm_tokens::text AS llm_tokens, inference_config::text AS inference_config,"
    " updated_at FROM tenants WHERE id = $1"
)


def as_tenant_id(value: uuid.UUID | str) -> uuid.UUID:
    """The tenant id as a UUID; a malformed id is an unknown tenant, not a crash."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise TenantNotFoundError(value) from None


class TenantConfigStore(Generic[T]):
    """Tenant configs by id, cached for ``ttl`` seconds.

    ``build`` turns a validated :class:`TenantConfig` into what the router caches (its route),
    so derived state is computed once per load, not per request. Concurrent misses for one
    tenant share one query. A tenant without a row is refused (``unknown_tenant="error"``) or
    served with system defaults (``"system_defaults"``: no tenant keys, default inference
    config); only found rows and defaults are cached, so a tenant created after a miss is seen
    on its next request.

    When PostgreSQL fails, a tenant loaded within the last ``stale_if_error`` seconds keeps
    its last known config (logged) instead of failing; for ``retry_after_error`` seconds after
    a failure, such tenants are served without asking the database again. ``query_timeout``
    bounds one config query.
    """

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        build: Callable[[TenantConfig], T],
        *,
        ttl: float = 300.0,
        maxsize: int = 10_000,
        unknown_tenant: UnknownTenantPolicy = "error",
        stale_if_error: float = 3600.0,
        retry_after_error: float = 5.0,
        query_timeout: float = 5.0,
    ) -> None:
        if unknown_tenant not in ("error", "system_defaults"):
            raise ValueError(
                f"unknown_tenant must be 'error' or 'system_defaults', not {unknown_tenant!r}"
            )
        self._pool = pool
        self._build = build
        self.unknown_tenant = unknown_tenant
        self._cache: TTLCache[uuid.UUID, T] = TTLCache(maxsize=maxsize, ttl=ttl)
        # Last known configs, the fallback while PostgreSQL is failing (None: no fallback).
        self._stale: TTLCache[uuid.UUID, T] | None = (
            TTLCache(maxsize=maxsize, ttl=stale_if_error) if stale_if_error > 0 else None
        )
        self._retry_after_error = retry_after_error
        self._query_timeout = query_timeout
        self._db_failed_until = 0.0
        self._inflight: dict[uuid.UUID, asyncio.Future[T]] = {}
        # Bumped by invalidate(): a load that began before an invalidation is not cached.
        self._generation = 0
        self.loads = 0  # queries made, for tests and metrics

    async def get(self, tenant_id: uuid.UUID) -> T:
        cached = self._cache.get(tenant_id)
        if cached is not None:
            return cached
        pending = self._inflight.get(tenant_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._inflight[tenant_id] = future
        try:
            value = await self._load(tenant_id)
        except BaseException as exc:
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # mark retrieved when nobody else waits
            else:
                future.cancel()
            raise
        else:
            future.set_result(value)
            return value
        finally:
            del self._inflight[tenant_id]

    async def _load(self, tenant_id: uuid.UUID) -> T:
        stale = self._stale.get(tenant_id) if self._stale is not None else None
        if stale is not None and time.monotonic() < self._db_failed_until:
            return stale  # the database failed moments ago: do not wait on it again
        self.loads += 1
        generation = self._generation
        try:
            row = await self._pool().fetchrow(_QUERY, tenant_id, timeout=self._query_timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._db_failed_until = time.monotonic() + self._retry_after_error
            if stale is not None:
                log.warning(
                    "tenant config query failed (%s); serving the last known config of %s",
                    type(exc).__name__,
                    tenant_id,
                )
                return stale
            raise ConfigUnavailableError(
                f"cannot load config of tenant {tenant_id}: {type(exc).__name__}: {exc}"
            ) from exc
        if row is None:
            if self.unknown_tenant == "error":
                raise TenantNotFoundError(tenant_id)
            config = TenantConfig(tenant_id, {}, InferenceConfig(), found=False)
        else:
            config = parse_tenant_config(
                tenant_id,
                row["llm_tokens"],
                row["inference_config"],
                updated_at=row["updated_at"],
                name=row["name"],
            )
        value = self._build(config)
        if generation == self._generation:
            self._cache[tenant_id] = value
            if self._stale is not None:
                self._stale[tenant_id] = value
        return value

    def invalidate(self, tenant_id: uuid.UUID | str | None = None) -> None:
        """Forget one tenant's config, or every tenant's with no argument."""
        self._generation += 1
        if tenant_id is None:
            self._cache.clear()
            return
        with contextlib.suppress(GatewayError):  # a malformed id was never cached
            self._cache.pop(as_tenant_id(tenant_id), None)
