"""TenantLLMRouter: per-tenant chains, failover, and one usage row per attempt."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import asyncpg

from usage import ModelUsageTracker
from usage.pricing import PriceBook, default_price_book

from ._defaults import DEFAULT_DSN
from .attempts import RequestLedger
from .chain import (
    ChainEntry,
    TenantRoute,
    build_route,
    explain_route,
    order_chain,
    rate_limit_wait,
)
from .config import TenantConfig
from .errors import (
    DatabaseError,
    GatewayError,
    NoProviderAvailableError,
    ProviderError,
    ProviderTimeoutError,
)
from .health import HealthRegistry
from .providers import Provider, ProviderSettings, create_provider, settings_from_env
from .streaming import CompletionStream
from .tenant_store import TenantConfigStore, UnknownTenantPolicy, as_tenant_id
from .types import CompletionResult, TaskType

__all__ = ["DEFAULT_DSN", "TenantLLMRouter"]


class TenantLLMRouter:
    """Routes chat completions for many tenants, each with its own keys and preferences.

    One router per process is the intended use: it owns one asyncpg pool (tenant configs),
    one HTTP connection pool per provider, the health state, and the usage writer. It is
    started on first use or by ``async with``; call :meth:`close` at shutdown so queued usage
    rows are written.

    Args:
        dsn: PostgreSQL DSN; default ``DATABASE_URL`` or :data:`DEFAULT_DSN`.
        pool: an existing asyncpg pool for config reads (the router does not close it).
        cache_ttl: seconds a tenant's config is cached.
        unknown_tenant: ``"error"`` raises :class:`TenantNotFoundError` for a tenant id without
            a row; ``"system_defaults"`` serves it with system keys and default settings.
        stale_if_error: while PostgreSQL fails, a tenant loaded within this many seconds is
            served with its last known config (0: fail with ConfigUnavailableError).
        providers: provider settings by name; default :func:`settings_from_env`.
        usage_tracker: where usage rows go; default a tracker of its own on ``dsn``.
        record_usage: ``False`` records nothing (tests of routing only).
        timeout: default total deadline of a request in seconds, every attempt included
            (for streams: until the first content chunk).
        attempt_timeout: cap of one non-streamed attempt (default: only the deadline).
        ttft_timeout: cap of one streamed attempt until its first content chunk.
        chunk_timeout: longest wait between two chunks of a stream.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: asyncpg.Pool | None = None,
        cache_ttl: float = 300.0,
        cache_maxsize: int = 10_000,
        unknown_tenant: UnknownTenantPolicy = "error",
        stale_if_error: float = 3600.0,
        providers: Mapping[str, ProviderSettings] | None = None,
        usage_tracker: ModelUsageTracker | None = None,
        record_usage: bool = True,
        timeout: float = 60.0,
        attempt_timeout: float | None = None,
        ttft_timeout: float = 15.0,
        chunk_timeout: float = 15.0,
        health: HealthRegistry | None = None,
        price_book: PriceBook | None = None,
    ) -> None:
        self.dsn = dsn or os.environ.get("DATABASE_URL") or DEFAULT_DSN
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.ttft_timeout = ttft_timeout
        self.chunk_timeout = chunk_timeout
        self._settings = dict(settings_from_env() if providers is None else providers)
        self._providers: dict[str, Provider] = {
            name: create_provider(s) for name, s in self._settings.items()
        }
        self._prices = price_book or default_price_book()
        self._health = health or HealthRegistry()
        self._pool = pool
        self._owns_pool = pool is None
        self._tracker = usage_tracker
        self._owns_tracker = usage_tracker is None and record_usage
        self._record_usage = record_usage
        self._store: TenantConfigStore[TenantRoute] = TenantConfigStore(
            self._get_pool,
            self._build_route,
            ttl=cache_ttl,
            maxsize=cache_maxsize,
            unknown_tenant=unknown_tenant,
            stale_if_error=stale_if_error,
        )
        self._started = False
        self._closed = False
        self._start_lock = asyncio.Lock()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to PostgreSQL and start the usage writer (idempotent)."""
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            if self._closed:
                raise GatewayError("router is closed")
            if self._pool is None:
                try:
                    self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4)
                except (OSError, asyncpg.PostgresError) as exc:
                    raise DatabaseError(
                        f"cannot connect to PostgreSQL ({type(exc).__name__}: {exc});"
                        " set DATABASE_URL or pass dsn="
                    ) from exc
            if self._record_usage:
                if self._tracker is None:
                    self._tracker = ModelUsageTracker(self.dsn, price_book=self._prices)
                await self._tracker.start()
            self._started = True

    async def close(self) -> None:
        """Drain queued usage rows, close HTTP pools and the database pool (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._tracker is not None and self._owns_tracker:
            await self._tracker.close()
        await asyncio.gather(*(p.aclose() for p in self._providers.values()))
        if self._pool is not None and self._owns_pool:
            await self._pool.close()

    async def __aenter__(self) -> TenantLLMRouter:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _get_pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "router not started"
        return self._pool

    def _build_route(self, config: TenantConfig) -> TenantRoute:
        return build_route(config, self._settings, self._prices.lookup)

    # --- configuration ---------------------------------------------------------------------

    def invalidate_cache(self, tenant_id: uuid.UUID | str | None = None) -> None:
        """Drop one tenant's cached config (after editing it), or every tenant's."""
        self._store.invalidate(tenant_id)

    async def tenant_config(self, tenant_id: uuid.UUID | str) -> TenantConfig:
        """The validated config the router uses for a tenant (cached)."""
        if not self._started:
            await self.start()
        return (await self._store.get(as_tenant_id(tenant_id))).config

    # --- requests --------------------------------------------------------------------------

    async def _plan(
        self, tenant_id: uuid.UUID | str, estimated_tokens: int, deadline: float
    ) -> tuple[uuid.UUID, list[ChainEntry]]:
        """The tenant's id and the entries to try, in order (config from cache).

        When every usable key is only waiting out a 429's Retry-After and the wait fits before
        ``deadline``, sleeps it out instead of failing.
        """
        if not self._started:
            await self.start()
        tid = as_tenant_id(tenant_id)
        route = await self._store.get(tid)
        while True:
            now = time.monotonic()
            chain = order_chain(route, self._health, estimated_tokens, now)
            if chain:
                return tid, chain
            wait = rate_limit_wait(route, self._health, now)
            if wait is None or now + wait > deadline:
                # Only now are the reasons worth collecting.
                skipped: dict[str, str] = {}
                order_chain(route, self._health, estimated_tokens, now, skipped)
                raise NoProviderAvailableError(tid, {**route.excluded, **skipped})
            await asyncio.sleep(wait)

    def _ledger(
        self,
        tenant_id: uuid.UUID,
        endpoint: str,
        user_id: str | None,
        task_type: TaskType,
        metadata: Mapping[str, Any] | None,
    ) -> RequestLedger:
        tracker = self._tracker if self._record_usage else None
        return RequestLedger(
            tenant_id, tracker, self._prices, endpoint, user_id, task_type, metadata
        )

    async def complete_for_tenant(
        self,
        tenant_id: uuid.UUID | str,
        messages: Sequence[Mapping[str, Any]],
        task_type: TaskType = TaskType.CHAT,
        estimated_tokens: int = 100,
        endpoint: str = "/api/chat",
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **params: Any,
    ) -> CompletionResult:
        """Complete ``messages`` for a tenant, failing over across its chain.

        ``params`` go to the provider as they are (``temperature``, ``max_tokens``, ``tools``,
        ...). ``timeout`` is the total deadline in seconds for every attempt together
        (default: the router's). Each attempt that reaches a provider becomes one
        ``model_usage_stats`` row.

        Raises:
            TenantNotFoundError, InvalidTenantConfigError: the tenant cannot be served.
            NoProviderAvailableError: no provider has a key, a fitting model and a closed
                breaker.
            BadRequestError: the provider rejected the request itself (not failed over).
            AllProvidersFailedError: every attempt failed; ``.attempts`` lists them.
            DeadlineExceededError: ``timeout`` ran out first.
        """
        started = time.monotonic()
        budget = self.timeout if timeout is None else timeout
        deadline = started + budget
        tid, chain = await self._plan(tenant_id, estimated_tokens, deadline)
        ledger = self._ledger(tid, endpoint, user_id, task_type, metadata)
        health = self._health
        deadline_hit = False
        retried = False
        while True:
            for entry in chain:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                state = health.get(entry.provider, entry.fingerprint)
                health.on_attempt(state)
                cap = (
                    remaining
                    if self.attempt_timeout is None
                    else min(remaining, self.attempt_timeout)
                )
                t0 = time.monotonic()
                try:
                    async with asyncio.timeout(cap):
                        response = await self._providers[entry.provider].complete(
                            key=entry.key,
                            model=entry.model,
                            messages=messages,
                            params=params,
                            timeout=cap,
                        )
                except TimeoutError:
                    error = ProviderTimeoutError(
                        f"no answer within {cap:.3g}s", provider=entry.provider, model=entry.model
                    )
                    health.on_failure(state, error)
                    ledger.failed(entry, error, time.monotonic() - t0)
                    deadline_hit = cap >= remaining
                    continue
                except ProviderError as error:
                    health.on_failure(state, error)
                    ledger.failed(entry, error, time.monotonic() - t0)
                    continue
                except asyncio.CancelledError as cancelled:
                    health.on_cancel(state)
                    ledger.record(entry, "cancelled", time.monotonic() - t0, error=cancelled)
                    raise
                latency = time.monotonic() - t0
                health.on_success(state, latency, response.headers)
                extra = (
                    {"finish_reason": response.finish_reason} if response.finish_reason else None
                )
                _, cost = ledger.record(
                    entry,
                    "success",
                    latency,
                    model=response.model,
                    input_tokens=response.input_tokens,
                    output_tokens=response.output_tokens,
                    cached_tokens=response.cached_tokens,
                    reasoning_tokens=response.reasoning_tokens,
                    extra=extra,
                )
                return CompletionResult(
                    content=response.content,
                    provider=entry.provider,
                    model=response.model,
                    tokens_input=response.input_tokens,
                    tokens_output=response.output_tokens,
                    cost=cost,
                    latency=time.monotonic() - started,
                    finish_reason=response.finish_reason,
                    tool_calls=response.tool_calls,
                    attempts=tuple(ledger.attempts),
                    request_id=ledger.request_id,
                    requested_model=entry.model,
                    key_source=entry.key_source,
                    raw=response.raw,
                )
            # The last key answered 429: if a key frees up within the deadline, wait once.
            last = ledger.attempts[-1] if ledger.attempts else None
            if retried or last is None or last.outcome != "rate_limit":
                break
            retried = True
            try:
                _, chain = await self._plan(tid, estimated_tokens, deadline)
            except NoProviderAvailableError:
                break
        raise ledger.gave_up(deadline_hit or time.monotonic() >= deadline, budget)

    async def stream_for_tenant(
        self,
        tenant_id: uuid.UUID | str,
        messages: Sequence[Mapping[str, Any]],
        task_type: TaskType = TaskType.CHAT,
        estimated_tokens: int = 100,
        endpoint: str = "/api/chat",
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **params: Any,
    ) -> CompletionStream:
        """Stream a completion; same arguments as :meth:`complete_for_tenant`.

        Returns once a provider produced its first content chunk (failing over until then);
        a later failure raises :class:`MidStreamError`. Use ``async with stream:``.
        """
        started = time.monotonic()
        budget = self.timeout if timeout is None else timeout
        tid, chain = await self._plan(tenant_id, estimated_tokens, started + budget)
        stream = CompletionStream(
            chain=chain,
            providers=self._providers,
            health=self._health,
            ledger=self._ledger(tid, endpoint, user_id, task_type, metadata),
            messages=messages,
            params=params,
            started=started,
            budget=budget,
            ttft_timeout=self.ttft_timeout,
            chunk_timeout=self.chunk_timeout,
        )
        await stream._open()
        return stream

    # --- introspection ---------------------------------------------------------------------

    def health(self) -> list[dict[str, Any]]:
        """Health of every provider key used so far (fingerprints only, never keys)."""
        return self._health.snapshot()

    async def explain(
        self, tenant_id: uuid.UUID | str, estimated_tokens: int = 100
    ) -> dict[str, Any]:
        """The chain a request would use now, with each entry's score and every exclusion."""
        if not self._started:
            await self.start()
        route = await self._store.get(as_tenant_id(tenant_id))
        return explain_route(route, self._health, estimated_tokens, time.monotonic())

    @property
    def usage_tracker(self) -> ModelUsageTracker | None:
        return self._tracker
