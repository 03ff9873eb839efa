"""What a router shows and edits besides requests: quotas, health, explain, models, configs."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import asyncpg

from usage import ModelUsageTracker

from .catalog import list_route_models
from .chain import TenantRoute, explain_route, route_for
from .config import TenantConfig
from .config_listener import ConfigListener
from .errors import GatewayError
from .governance.gate import DEFAULT_MAX_TOKENS, QuotaGate
from .governance.keys import KeyQuota
from .health import HealthRegistry
from .keys import ApiKey, Fingerprinter
from .providers import ProviderSettings
from .secrets import KeyRing
from .tenant_keys import set_tenant_keys as write_tenant_keys
from .tenant_store import TenantConfigStore, as_tenant_id

__all__ = ["RouterIntrospection"]


class RouterIntrospection:
    """The base of :class:`~llm_gateway.router.TenantLLMRouter` with its calls besides
    requests; they read the state the router's constructor and :meth:`start` set."""

    _settings: dict[str, ProviderSettings]
    _health: HealthRegistry
    _store: TenantConfigStore[TenantRoute]
    _gate: QuotaGate
    _keyring: KeyRing
    _listener: ConfigListener | None
    _tracker: ModelUsageTracker | None
    _fingerprint: Fingerprinter | None
    _started: bool

    if TYPE_CHECKING:  # the router's own

        async def start(self) -> None: ...

        def _get_pool(self) -> asyncpg.Pool: ...

    def key_fingerprint(self, key: str | ApiKey) -> str:
        """The fingerprint this deployment shows for ``key`` in health, explain and usage rows."""
        if self._fingerprint is None:
            # Never a fingerprint under an unknown secret: it would differ from the real one.
            raise GatewayError("router not started: key fingerprints are not known yet")
        return self._fingerprint(key)

    # --- configuration ---------------------------------------------------------------------

    def invalidate_cache(self, tenant_id: uuid.UUID | str | None = None) -> None:
        """Drop one tenant's cached config, or every tenant's, in this process only.

        Rarely needed: with migration 006 every edit of ``tenants`` (by any process, plain SQL
        included) notifies every router, whose listener drops the tenant's config itself.
        """
        self._store.invalidate(tenant_id)

    async def set_tenant_keys(
        self, tenant_id: uuid.UUID | str, keys: Mapping[str, str | None]
    ) -> None:
        """Encrypt ``keys`` ({provider: key}) and merge them into the tenant's ``llm_tokens``
        in one ``UPDATE``; a ``None`` value removes that provider's key. This router's cached
        config of the tenant is dropped (other processes: the tenants NOTIFY trigger)."""
        if not self._started:
            await self.start()
        tid = as_tenant_id(tenant_id)
        await write_tenant_keys(self._get_pool(), self._keyring, tid, keys)
        self._store.invalidate(tid)

    async def tenant_config(self, tenant_id: uuid.UUID | str) -> TenantConfig:
        """The validated config the router uses for a tenant (cached)."""
        if not self._started:
            await self.start()
        return (await self._store.get(as_tenant_id(tenant_id))).config

    # --- introspection ---------------------------------------------------------------------

    async def quota_status(
        self,
        tenant_id: uuid.UUID | str,
        user_id: str | None = None,
        key_quota: KeyQuota | None = None,
    ) -> list[dict[str, Any]]:
        """One dict per configured budget or limit of the tenant (and of ``user_id``, and of
        the virtual key ``key_quota``): ``scope``, ``limit``, ``allowed``, ``used``,
        ``reserved``, ``remaining``, ``resets_at`` -- the numbers admission acts on, fresh
        from PostgreSQL."""
        if not self._started:
            await self.start()
        tid = as_tenant_id(tenant_id)
        route = await self._store.get(tid)
        return await self._gate.status(route.quota, tid, user_id, key_quota)

    def health(self) -> list[dict[str, Any]]:
        """Health of every provider key used so far (fingerprints only, never keys).

        The config listener's state is in :meth:`status`."""
        return self._health.snapshot()

    def status(self) -> dict[str, Any]:
        """``{"providers": health(), "config_listener": {...} or None}``.

        ``config_listener["state"]``: ``starting``, ``listening``, ``reconnecting`` (configs
        then expire by ``cache_ttl`` only) or ``closed``; ``None`` when it is off.
        """
        listener = self._listener.status() if self._listener is not None else None
        return {"providers": self.health(), "config_listener": listener}

    async def explain(
        self,
        tenant_id: uuid.UUID | str,
        estimated_tokens: int | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """The chain a request would use now, with each entry's score and every exclusion;
        ``model`` as for :meth:`complete_for_tenant`."""
        if not self._started:
            await self.start()
        route = route_for(await self._store.get(as_tenant_id(tenant_id)), model)
        tokens = 100 if estimated_tokens is None else estimated_tokens
        explained = explain_route(route, self._health, tokens, self._health.clock())
        if route.quota is not None:
            quota = self._gate.governor.steering(
                route.quota, route.entries, tokens, DEFAULT_MAX_TOKENS
            )
            if quota:
                explained["chain"] = [c for c in explained["chain"] if c["provider"] not in quota]
                explained["excluded"] = {**explained["excluded"], **quota}
        return explained

    async def list_models(self, tenant_id: uuid.UUID | str) -> dict[str, Any]:
        """Every provider and model the tenant can be served by now, and why others cannot.

        ``models``: one row per (provider, model) with the key source and fingerprint, context
        window, price per million tokens, health and, when it cannot be used now, the reason;
        ``groups``: its model groups, entry by entry; ``excluded``: providers it can never use.
        """
        if not self._started:
            await self.start()
        route = await self._store.get(as_tenant_id(tenant_id))
        return list_route_models(route, self._health, self._health.clock())

    @property
    def usage_tracker(self) -> ModelUsageTracker | None:
        return self._tracker

    @property
    def provider_names(self) -> tuple[str, ...]:
        """The providers this router has settings for (``providers=`` or the environment)."""
        return tuple(self._settings)
