"""Loads tenant configuration from PostgreSQL into a TTL cache, one query per miss."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Generic, Literal, TypeVar

import asyncpg
from cachetools import TTLCache

from .config import InferenceConfig, TenantConfig, parse_tenant_config
from .errors import ConfigUnavailableError, GatewayError, TenantNotFoundError
from .secrets import KeyRing

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
    bounds one config load: waiting for a pooled connection and the query together.
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
        keyring: KeyRing | None = None,
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
        self._keyring = keyring  # decrypts enc:v1 llm_tokens values, once per load
        self._db_failed_until = 0.0
        # The current load of each tenant; invalidate() detaches (removes) it.
        self._inflight: dict[uuid.UUID, asyncio.Task[T]] = {}
        # Every running load, detached ones included: the loop keeps only weak references.
        self._loading: set[asyncio.Task[T]] = set()
        self.loads = 0  # queries made, for tests and metrics
        # Lookups served from the cache, not (a load made or joined), and loads that served
        # the last known config while PostgreSQL failed; read by llm_gateway.metrics.
        self.hits = 0
        self.misses = 0
        self.stale = 0

    async def get(self, tenant_id: uuid.UUID) -> T:
        """The tenant's config (built), from the cache or one shared load."""
        cached = self._cache.get(tenant_id)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        load = self._inflight.get(tenant_id)
        if load is None:
            # The load runs in a task of its own: cancelling one caller (even the one that
            # started it) must not cancel the others waiting on it.
            load = asyncio.get_running_loop().create_task(self._load(tenant_id))
            self._inflight[tenant_id] = load
            self._loading.add(load)
            load.add_done_callback(functools.partial(self._load_done, tenant_id))
        return await asyncio.shield(load)

    def _load_done(self, tenant_id: uuid.UUID, load: asyncio.Task[T]) -> None:
        self._loading.discard(load)
        if self._inflight.get(tenant_id) is load:
            del self._inflight[tenant_id]
        if not load.cancelled():
            load.exception()  # retrieved, even when every waiter was cancelled

    def _attached(self, tenant_id: uuid.UUID) -> bool:
        """Whether the running load is still the current one (not detached by invalidate)."""
        return self._inflight.get(tenant_id) is asyncio.current_task()

    async def _load(self, tenant_id: uuid.UUID) -> T:
        stale = self._stale.get(tenant_id) if self._stale is not None else None
        if stale is not None and time.monotonic() < self._db_failed_until:
            self.stale += 1
            return stale  # the database failed moments ago: do not wait on it again
        self.loads += 1
        try:
            # One bound for waiting on a pooled connection (or a new one) and the query.
            deadline = time.monotonic() + self._query_timeout
            async with self._pool().acquire(timeout=self._query_timeout) as conn:
                left = max(deadline - time.monotonic(), 0.001)
                row = await conn.fetchrow(_QUERY, tenant_id, timeout=left)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._db_failed_until = time.monotonic() + self._retry_after_error
            if stale is not None:
                log.warning(
                    "tenant config query failed (%s); serving the last known config of %s",
                    type(exc).__name__,
                    tenant_id,
                )
                self.stale += 1
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
                keyring=self._keyring,
            )
        value = self._build(config)
        if self._attached(tenant_id):
            # A load detached by invalidate() may have read the row before the change.
            self._cache[tenant_id] = value
            if self._stale is not None:
                self._stale[tenant_id] = value
        return value

    def invalidate(self, tenant_id: uuid.UUID | str | None = None) -> None:
        """Forget one tenant's config, or every tenant's with no argument.

        Loads in flight are detached too: a request made after this call starts a new query
        rather than joining one that may have read the row before the change (the requests
        already waiting on it still get its result, which is not cached).
        """
        if tenant_id is None:
            self._cache.clear()
            self._inflight.clear()
            return
        with contextlib.suppress(GatewayError):  # a malformed id was never cached
            self.invalidate_many((as_tenant_id(tenant_id),))

    def invalidate_many(self, tenant_ids: Iterable[uuid.UUID]) -> None:
        """Forget these tenants' configs and detach their loads, as :meth:`invalidate` does.

        Called by the config listener for each notice (up to 200 ids): one pass, no I/O.
        """
        cache, inflight = self._cache, self._inflight
        for tid in tenant_ids:
            # Most ids of a bulk edit are not cached here: a lookup is 3x cheaper than pop().
            if tid in cache:
                cache.pop(tid, None)
            if inflight:
                inflight.pop(tid, None)
