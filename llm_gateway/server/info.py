"""``GET /v1/models``, the health probes and ``/metrics``: what the gateway can serve now."""

from __future__ import annotations

import importlib
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from .chat import error_response, json_response
from .errors import api_error
from .openai_shapes import model_list

if TYPE_CHECKING:
    from .state import Gateway

__all__ = ["liveness", "metrics", "models", "readiness"]

GROUP_OWNER = "llm-gateway"
"""``owned_by`` of a model group in ``/v1/models`` (a model's is its first provider)."""


async def models(request: Request) -> Response:
    """The models and model groups the key's tenant can use, as OpenAI model ids, filtered by
    the key's ``models``. A request may name any of them as its ``model``."""
    gateway: Gateway = request.app.state.gateway
    try:
        key = await gateway.authenticate(request.headers)
        listing = await gateway.router.list_models(key.tenant_id)
    except Exception as exc:
        return error_response(api_error(exc))
    owners: dict[str, str] = {}
    for row in listing["models"]:
        owners.setdefault(row["model"], row["provider"])
    for group in listing["groups"]:
        owners.setdefault(group["name"], GROUP_OWNER)
    allowed = [(m, o) for m, o in owners.items() if gateway.keys.allows_model(key, m)]
    return json_response(model_list(allowed, int(time.time())))


async def liveness(request: Request) -> Response:
    """The process serves HTTP (no dependency is checked: a restart would not fix one)."""
    return json_response({"status": "ok"})


def _providers(gateway: Gateway) -> dict[str, Any]:
    """Configured providers and those usable now: never tried, or with at least one key
    whose circuit is not open."""
    configured = list(gateway.router.provider_names)
    open_keys: dict[str, bool] = {}
    for state in gateway.router.health():
        provider = state["provider"]
        usable = state["state"] != "open"
        open_keys[provider] = open_keys.get(provider, False) or usable
    usable = [p for p in configured if open_keys.get(p, True)]
    return {"configured": configured, "usable": usable}


async def readiness(request: Request) -> Response:
    """200 when PostgreSQL answers and at least one provider is usable, else 503."""
    gateway: Gateway = request.app.state.gateway
    database = await gateway.database_ok()
    providers = _providers(gateway)
    ready = database is None and bool(providers["usable"])
    body = {
        "status": "ready" if ready else "not_ready",
        "database": "ok" if database is None else f"unavailable ({database})",
        "providers": providers,
    }
    return json_response(body, 200 if ready else 503)


async def metrics(request: Request) -> Response:
    """Prometheus text format of the router's registry (needs ``prometheus_client``)."""
    # Imported by name: the metrics extra is optional (and so are its type hints).
    prometheus = importlib.import_module("prometheus_client")
    gateway: Gateway = request.app.state.gateway
    registry = gateway.metrics_registry or prometheus.REGISTRY
    return Response(
        prometheus.generate_latest(registry),
        headers={"content-type": prometheus.CONTENT_TYPE_LATEST},
    )
