"""What a tenant can use: every provider and model, from the routes built with its config.

Read-only over a cached :class:`~.chain.TenantRoute` and the health registry: no I/O.
"""

from __future__ import annotations

from typing import Any

from .chain import ChainEntry, TenantRoute
from .health import HealthRegistry

__all__ = ["list_route_models"]


def _health(entry: ChainEntry, health: HealthRegistry, now: float) -> dict[str, Any]:
    state = health.peek(entry.provider, entry.fingerprint)
    if state is None:
        return {"state": "unused"}
    full = state.as_dict(now)
    keep = ("state", "error_rate", "latency_ewma_ms", "rate_limited_for_s", "consecutive_failures")
    return {k: full[k] for k in keep}


def _row(entry: ChainEntry, health: HealthRegistry, now: float) -> dict[str, Any]:
    reason = health.blocked(health.peek(entry.provider, entry.fingerprint), now)
    prices = entry.price_per_m
    return {
        "provider": entry.provider,
        "model": entry.model,
        "key_source": entry.key_source,
        "key_fingerprint": entry.fingerprint,
        "context_window": entry.context_window,
        "price_per_m": None if prices is None else {"input": prices[0], "output": prices[1]},
        "health": _health(entry, health, now),
        "available": reason is None,
        "reason": reason,
    }


def list_route_models(route: TenantRoute, health: HealthRegistry, now: float) -> dict[str, Any]:
    """The tenant's models (JSON-ready): see :meth:`TenantLLMRouter.list_models`."""
    place = {e.provider: i for i, e in enumerate(route.entries)}
    entries = [e for model in route.models.values() for e in model.entries]
    entries.sort(key=lambda e: (place.get(e.provider, len(place)), e.model))
    groups = []
    for name, group in sorted(route.groups.items()):
        found = {(e.provider, e.model): e for e in group.entries}
        members = []
        for provider, model in group.members:
            entry = found.get((provider, model))
            reason = (
                group.excluded.get(f"{provider}/{model}")
                if entry is None
                else health.blocked(health.peek(provider, entry.fingerprint), now)
            )
            members.append(
                {
                    "provider": provider,
                    "model": model,
                    "context_window": None if entry is None else entry.context_window,
                    "available": reason is None,
                    "reason": reason,
                }
            )
        groups.append({"name": name, "source": group.source, "entries": members})
    return {
        "tenant_id": str(route.config.tenant_id),
        "use_system_keys": route.config.inference.use_system_keys,
        "models": [_row(e, health, now) for e in entries],
        "groups": groups,
        "excluded": dict(route.excluded),
    }
