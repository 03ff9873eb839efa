"""TenantLLMRouter: per-tenant chains, failover, and one usage row per attempt."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import asyncpg

from usage import ModelUsageTracker
from usage.pricing import PriceBook, default_price_book
from usage.tracker import DEFAULT_DSN, resolve_dsn

from .attempts import CompletionCall
from .chain import TenantRoute, build_route
from .config import GroupEntry, HedgeConfig, TenantConfig, parse_model_groups
from .config_listener import ConfigListener
from .dsn import create_pool_checked, validate_dsn
from .errors import RouterClosedError
from .governance.admission import OnDbError
from .governance.alerts import BudgetEventCallback
from .governance.gate import QuotaGate
from .governance.keys import KeyQuota
from .health import HealthRegistry
from .introspection import RouterIntrospection
from .keys import Fingerprinter, deployment_fingerprinter
from .observability import Observer, RequestObservation, build_observer
from .planning import RESERVED, PlannedRequest, RequestPlanner, request_labels, reserved_parameter
from .providers import Provider, ProviderSettings, create_provider, settings_from_env
from .secrets import KeyRing
from .streaming import CompletionStream
from .tenant_store import TenantConfigStore, UnknownTenantPolicy
from .types import CompletionResult, TaskType

__all__ = ["DEFAULT_DSN", "TenantLLMRouter"]

log = logging.getLogger("llm_gateway")


class TenantLLMRouter(RouterIntrospection):
    """Routes chat completions for many tenants, each with its own keys and preferences.

    One router per process is the intended use: it owns one asyncpg pool (tenant configs),
    one HTTP connection pool per provider, the health state, and the usage writer. It is
    started on first use or by ``async with``; call :meth:`close` at shutdown so queued usage
    rows are written.

    Args:
        dsn: PostgreSQL DSN; default ``DATABASE_URL`` or :data:`DEFAULT_DSN`
            (:func:`usage.tracker.resolve_dsn`).
        pool: an existing asyncpg pool for config reads (the router does not close it).
        cache_ttl: seconds a tenant's config is cached.
        unknown_tenant: ``"error"`` raises :class:`TenantNotFoundError` for a tenant id without
            a row; ``"system_defaults"`` serves it with system keys and default settings.
        stale_if_error: while PostgreSQL fails, a tenant loaded within this many seconds is
            served with its last known config (0: fail with ConfigUnavailableError).
        providers: provider settings by name; default :func:`settings_from_env`.
        usage_tracker: where usage rows go; default a tracker of its own on ``dsn``.
        spool_dir: the spool of the router's own usage tracker (default
            ``$LLM_GATEWAY_SPOOL_DIR`` or ``~/.cache/llm-gateway/spool``).
        record_usage: ``False`` records nothing (tests of routing only).
        timeout: default total deadline of a request in seconds, every attempt included
            (for streams: until the first content chunk).
        attempt_timeout: fixed cap of one non-streamed attempt (default: adaptive, from the
            provider's recent latencies; see :class:`~llm_gateway.health.AdaptiveTimeouts`).
        hedge: hedge non-streamed requests, ``{"after_ms": 800}`` or ``{"after": "p95"}``
            (:class:`~llm_gateway.config.HedgeConfig`); a tenant's ``inference_config.hedge``
            wins. Default: no hedging.
        ttft_timeout: cap of one streamed attempt until its first content chunk.
        chunk_timeout: longest wait between two chunks of a stream.
        connect_timeout: seconds to connect to PostgreSQL for config reads (default 5).
        fingerprint_key: the deployment's secret for key fingerprints (default
            ``LLM_GATEWAY_FINGERPRINT_KEY``, else generated once and kept in PostgreSQL).
        model_groups: router-wide model groups, ``{"smart": [{"provider": "groq", "model":
            "llama-3.3-70b-versatile"}, ...]}``; a tenant's own group of a name wins.
        keyring: the key ring of tenants' encrypted keys: ``"id1:<base64>,id2:..."`` or a
            mapping of id to 32 key bytes, the active (encrypting) id first (default
            ``LLM_GATEWAY_KEYRING``; see :mod:`llm_gateway.secrets`).
        config_notify: keep one connection on ``dsn`` listening for tenant config edits
            (migration 006), so they reach the cache at once. Default: on, unless ``pool=``
            is given without ``dsn=`` (the listener must reach the pool's database).
        metrics: a ``prometheus_client`` registry (or ``True``: the default one) to count
            in (:mod:`llm_gateway.metrics`); default: the one given to ``metrics.enable()``.
        metrics_tenant_labels: tenants whose metrics carry a ``tenant`` label.
        tracer_provider: an OpenTelemetry ``TracerProvider``: a span per request and per
            attempt (:mod:`llm_gateway.tracing`); ``tracing=True``: the global provider.
        trace_content: put messages and answers on the spans (default: never).
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
        spool_dir: str | os.PathLike[str] | None = None,
        record_usage: bool = True,
        timeout: float = 60.0,
        attempt_timeout: float | None = None,
        ttft_timeout: float = 15.0,
        chunk_timeout: float = 15.0,
        connect_timeout: float = 5.0,
        health: HealthRegistry | None = None,
        price_book: PriceBook | None = None,
        fingerprint_key: str | None = None,
        model_groups: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
        keyring: KeyRing | str | Mapping[str, bytes] | None = None,
        config_notify: bool | None = None,
        hedge: Mapping[str, Any] | HedgeConfig | None = None,
        default_limits: Mapping[str, Any] | None = None,
        quota_on_db_error: OnDbError = "open",
        on_budget_event: BudgetEventCallback | None = None,
        metrics: Any = None,
        metrics_tenant_labels: Sequence[uuid.UUID | str] | None = None,
        tracer_provider: Any = None,
        tracing: bool = False,
        trace_content: bool = False,
    ) -> None:
        # Validated first: a malformed group is the caller's error, before any other setup.
        self._model_groups: Mapping[str, tuple[GroupEntry, ...]] = parse_model_groups(
            model_groups or {}
        )
        self.dsn = resolve_dsn(dsn)
        # Validated now: a typo raises here (pydantic's ValueError), not at the first request.
        self.hedge = None if hedge is None else HedgeConfig.model_validate(hedge)
        if pool is None or (usage_tracker is None and record_usage):  # the DSN will be used
            validate_dsn(self.dsn, check="dsn= or DATABASE_URL")  # ConfigError now, not asyncpg's
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._spool_dir = spool_dir
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
        self._keyring = KeyRing.coerce(keyring)
        self._store: TenantConfigStore[TenantRoute] = TenantConfigStore(
            self._get_pool,
            self._build_route,
            ttl=cache_ttl,
            maxsize=cache_maxsize,
            unknown_tenant=unknown_tenant,
            stale_if_error=stale_if_error,
            keyring=self._keyring,
        )
        self._fingerprint_key = fingerprint_key
        listen = (pool is None or dsn is not None) if config_notify is None else config_notify
        self._listener: ConfigListener | None = (
            ConfigListener(
                self.dsn,
                self._store.invalidate_many,
                self._store.invalidate,
                connect_timeout=connect_timeout,
            )
            if listen
            else None
        )
        self._gate = QuotaGate.build(
            self._get_pool, default_limits, quota_on_db_error, on_budget_event
        )
        self._planner = RequestPlanner(
            self._store,
            self._health,
            self._gate,
            self._prices,
            usage_tracker if record_usage else None,
        )
        # None unless metrics or tracing is on: then each hook is one `is None` test.
        self._observer: Observer | None = build_observer(
            metrics=metrics,
            tracer_provider=tracer_provider,
            tracing=tracing,
            tenant_labels=metrics_tenant_labels,
            trace_content=trace_content,
        )
        if self._observer is not None:
            me = weakref.ref(self)  # the observer must not keep the router alive

            def tracker() -> ModelUsageTracker | None:
                router = me()
                return None if router is None else router.usage_tracker

            self._observer.watch(self._health, self._store, tracker)
        self._fingerprint: Fingerprinter | None = None  # known once started
        self._started = False
        self._closed = False
        self._start_lock = asyncio.Lock()
        # Requests (and open streams) in flight, so close() can let them end first.
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._streams: weakref.WeakSet[CompletionStream] = weakref.WeakSet()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to PostgreSQL and start the usage writer (idempotent)."""
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            if self._closed:
                raise RouterClosedError("router is closed")
            if self._pool is None:
                self._pool = await create_pool_checked(
                    self.dsn,
                    self.connect_timeout,
                    check="dsn= or DATABASE_URL",
                    min_size=1,
                    max_size=4,
                )
            if self._fingerprint is None:
                self._fingerprint = await deployment_fingerprinter(
                    self._pool, self._fingerprint_key
                )
            if not self._owns_tracker:
                # No tracker of ours loads model_prices into this book, yet budgets price
                # the chain with it (shipped prices stay if the table cannot be read).
                try:
                    await self._prices.refresh(self._pool)
                except Exception as exc:
                    log.warning("could not load model_prices: %s", type(exc).__name__)
            if self._listener is not None:
                # Bounded and never fatal: while it is down, the cache TTL bounds staleness.
                self._listener.start()
                await self._listener.wait_first_attempt(self.connect_timeout)
            if self._record_usage:
                if self._tracker is None:
                    self._tracker = ModelUsageTracker(
                        self.dsn, price_book=self._prices, spool_dir=self._spool_dir
                    )
                await self._tracker.start()
                self._planner.tracker = self._tracker
                governor = self._gate.governor
                self._tracker.add_settle_listener(
                    lambda rows: governor.rows_settled(r.id for r in rows)
                )
            self._gate.governor.start()
            self._started = True

    async def close(self, timeout: float = 30.0) -> None:
        """Shut down without losing a usage row (idempotent).

        New requests are refused at once (:class:`RouterClosedError`); requests and open
        streams in flight get up to ``timeout`` seconds to end (a stream still open then is
        recorded as cancelled). Then the HTTP pools close, the usage tracker drains (spooling
        what PostgreSQL does not take), and the database pool closes.
        """
        if self._closed:
            return
        self._closed = True
        if self._inflight:
            self._idle = asyncio.Event()
            try:
                async with asyncio.timeout(timeout):
                    await self._idle.wait()
            except TimeoutError:
                log.warning(
                    "router.close(): %d request(s) still in flight after %gs",
                    self._inflight,
                    timeout,
                )
        for stream in list(self._streams):
            stream._abandon()  # its row, before the tracker drains
        await asyncio.gather(*(p.aclose() for p in self._providers.values()))
        if self._started:
            if self._tracker is not None:
                # Rows written first, so the last renewal sees this process's spend.
                await self._tracker.flush(timeout=min(5.0, timeout))
            await self._gate.close()  # leases given back, budget alerts sent
        if self._listener is not None:
            await self._listener.close()
        if self._tracker is not None and self._owns_tracker:
            await self._tracker.close()
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
        return build_route(
            config,
            self._settings,
            self._prices.lookup,
            self.key_fingerprint,
            self._model_groups,
            self._gate.plan(config),
        )

    # --- requests --------------------------------------------------------------------------

    def _admit(self, params: Mapping[str, Any]) -> None:
        """Refuse a request up front: the router is closing, or a parameter is reserved."""
        if self._closed:
            raise RouterClosedError("router is closing; it accepts no new request")
        if params and not RESERVED.keys().isdisjoint(params):
            raise reserved_parameter(params)
        self._inflight += 1

    def _leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._idle is not None:
            self._idle.set()

    async def _prepare(
        self,
        tenant_id: uuid.UUID | str,
        messages: Sequence[Mapping[str, Any]],
        estimated_tokens: int | None,
        endpoint: str,
        user_id: str | None,
        task_type: TaskType,
        metadata: Mapping[str, Any] | None,
        timeout: float | None,
        model: str | None,
        session_id: str | None,
        tags: Sequence[str] | None,
        key_quota: KeyQuota | None,
        params: Mapping[str, Any],
        stream: bool,
    ) -> PlannedRequest:
        """The set-up of both request methods: checked, counted in flight, observed, planned
        and admitted. When planning or admission fails, it leaves the in-flight count and its
        end is observed before the error propagates."""
        labels = request_labels(session_id, tags, metadata)
        self._admit(params)
        observer = self._observer  # None: metrics and tracing off, nothing made
        obs = (
            None
            if observer is None
            else RequestObservation(observer, tenant_id, model, messages, stream)
        )
        try:
            started = time.monotonic()
            budget = self.timeout if timeout is None else timeout
            if not self._started:
                await self.start()
            return await self._planner.begin(
                tenant_id, messages, estimated_tokens, started, budget, model, params,
                (endpoint, user_id, task_type, metadata, labels), key_quota, obs,
            )  # fmt: skip
        except BaseException as exc:
            if obs is not None:
                obs.ended(None, exc)
            self._leave()
            raise

    async def complete_for_tenant(
        self,
        tenant_id: uuid.UUID | str,
        messages: Sequence[Mapping[str, Any]],
        task_type: TaskType = TaskType.CHAT,
        estimated_tokens: int | None = None,
        endpoint: str = "/api/chat",
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        model: str | None = None,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        key_quota: KeyQuota | None = None,
        **params: Any,
    ) -> CompletionResult:
        """Complete ``messages`` for a tenant, failing over across its chain.

        ``model`` names a model group (the tenant's, else the router's: routed over its list,
        in order) or a concrete model (routed to the tenant's providers that serve it);
        default: the tenant's usual chain. ``params`` go to the provider as they are
        (``temperature``, ``max_tokens``, ``tools``, ...); ``stream`` and the SDK's
        ``extra_*`` are reserved. ``key_quota`` (:class:`~llm_gateway.governance.KeyQuota`)
        adds a virtual key's budget and rate limits (refusals with scope ``"key"``); the
        request's rows carry its ``virtual_key_id``.
        ``timeout`` is the total deadline in seconds for every attempt together (default: the
        router's). Each attempt that reaches a provider becomes one ``model_usage_stats`` row;
        ``metadata`` is stored in it under ``metadata.caller``. ``session_id`` and ``tags``
        (default: the same keys of ``metadata``) are stored as columns of every row.

        Raises:
            InvalidRequestError: a reserved or unserialisable parameter (nothing was sent);
                :class:`UnknownModelError` for a ``model`` that is no group or served model.
            RouterClosedError: the router is closing.
            TenantNotFoundError, InvalidTenantConfigError: the tenant cannot be served.
            NoProviderAvailableError: no provider has a key, a fitting model and a closed
                breaker.
            BadRequestError: the provider rejected the request itself (not failed over;
                a :class:`ContextWindowExceededError` is, within a model group).
            AllProvidersFailedError: every attempt failed; ``.attempts`` lists them.
            InvalidRequestError: also for an invalid ``session_id`` or ``tags``.
            DeadlineExceededError: ``timeout`` ran out first.
        """
        req = await self._prepare(
            tenant_id, messages, estimated_tokens, endpoint, user_id, task_type, metadata,
            timeout, model, session_id, tags, key_quota, params, False,
        )  # fmt: skip
        admission, obs = req.admission, req.ledger.obs  # obs: None when metrics, tracing off
        try:
            call = CompletionCall(
                self._providers,
                messages,
                params,
                ledger=req.ledger,
                health=self._health,
                started=req.started,
                cap=self.attempt_timeout,
                hedge=req.route.config.inference.hedge or self.hedge,
            )
            result = await self._planner.attempt(call, req, call)
            if admission is not None:
                self._gate.release(
                    admission, (result.tokens_input or 0) + (result.tokens_output or 0)
                )
            if obs is not None:
                obs.ended(result, None)
            return result
        except BaseException as exc:
            if obs is not None:
                obs.ended(None, exc)
            raise
        finally:
            self._gate.release(admission, None)  # no-op once released
            self._leave()

    async def stream_for_tenant(
        self,
        tenant_id: uuid.UUID | str,
        messages: Sequence[Mapping[str, Any]],
        task_type: TaskType = TaskType.CHAT,
        estimated_tokens: int | None = None,
        endpoint: str = "/api/chat",
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        model: str | None = None,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        key_quota: KeyQuota | None = None,
        **params: Any,
    ) -> CompletionStream:
        """Stream a completion; same arguments as :meth:`complete_for_tenant`.

        Returns once a provider produced its first content chunk (failing over until then,
        through the same attempt loop); a later failure raises :class:`MidStreamError`. Use
        ``async with stream:``. An open stream counts as in flight for :meth:`close`.
        """
        req = await self._prepare(
            tenant_id, messages, estimated_tokens, endpoint, user_id, task_type, metadata,
            timeout, model, session_id, tags, key_quota, params, True,
        )  # fmt: skip
        gate, held = self._gate, req.admission

        def done() -> None:
            gate.release(held, None)
            self._leave()

        try:
            stream = CompletionStream(
                providers=self._providers,
                health=self._health,
                ledger=req.ledger,
                messages=messages,
                params=params,
                started=req.started,
                ttft_timeout=self.ttft_timeout,
                chunk_timeout=self.chunk_timeout,
                on_done=done,
            )
            await self._planner.attempt(stream, req)
        except BaseException as exc:
            done()
            obs = req.ledger.obs
            if obs is not None:
                obs.ended(None, exc)  # no-op when the stream's own end said it
            raise
        self._streams.add(stream)
        return stream
