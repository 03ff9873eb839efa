"""``create_app``: the OpenAI-compatible ASGI app, its routes and its lifespan.

Run it with ``llm-gateway serve``, or under any ASGI server::

    uvicorn --factory llm_gateway.server.app:create_app --port 8080

(or ``llm_gateway.server.asgi:app``, an app made by ``create_app()`` at import). Without
arguments everything comes from the environment: ``DATABASE_URL``, the providers' variables
(see :func:`~llm_gateway.providers.settings_from_env`) and ``LLM_GATEWAY_SHUTDOWN_TIMEOUT``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .chat import chat_completions, error_response
from .errors import ApiError, api_error
from .info import liveness, metrics, models, readiness
from .request import DEFAULT_MAX_BODY_BYTES
from .state import DEFAULT_SHUTDOWN_TIMEOUT, Gateway

if TYPE_CHECKING:
    import asyncpg

    from ..router import TenantLLMRouter
    from .virtual_keys import VirtualKeyStore

__all__ = ["SHUTDOWN_TIMEOUT_ENV", "create_app"]

SHUTDOWN_TIMEOUT_ENV = "LLM_GATEWAY_SHUTDOWN_TIMEOUT"


def _metrics_available() -> bool:
    return importlib.util.find_spec("prometheus_client") is not None


def _default_router(dsn: str | None) -> tuple[TenantLLMRouter, Any]:
    """A router from the environment, with Prometheus metrics when they are installed."""
    from ..router import TenantLLMRouter

    registry = None
    with contextlib.suppress(ImportError):  # the metrics extra is optional
        from .. import metrics as gateway_metrics  # type: ignore[attr-defined,unused-ignore]

        registry = gateway_metrics.enable()
    return TenantLLMRouter(dsn), registry


def _shutdown_timeout(value: float | None) -> float:
    if value is not None:
        return value
    text = os.environ.get(SHUTDOWN_TIMEOUT_ENV)
    return float(text) if text else DEFAULT_SHUTDOWN_TIMEOUT


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown path, wrong method) in the OpenAI shape too."""
    assert isinstance(exc, HTTPException)
    return error_response(ApiError(exc.status_code, exc.detail, headers=exc.headers))


async def _unexpected(request: Request, exc: Exception) -> Response:
    return error_response(api_error(exc))  # logged there; the body says only "internal error"


def create_app(
    router: TenantLLMRouter | None = None,
    keys: VirtualKeyStore | None = None,
    *,
    dsn: str | None = None,
    pool: asyncpg.Pool | None = None,
    shutdown_timeout: float | None = None,
    readiness_timeout: float = 2.0,
    metrics_registry: Any = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Starlette:
    """The gateway as an ASGI app.

    Args:
        router: the router that serves requests; default one made from ``dsn`` and the
            environment (closed by the app at shutdown; a given router is only started).
        keys: the virtual key store; default one on ``pool`` (closed by the app).
        dsn: PostgreSQL, when the router is made here (default ``DATABASE_URL``).
        pool: the pool of the key store and of the readiness probe; default a small pool
            of the app's own on the router's DSN.
        shutdown_timeout: after the server stopped accepting and let in-flight requests
            end, the most a made router waits for any still running before it drains the
            usage queue (default ``$LLM_GATEWAY_SHUTDOWN_TIMEOUT`` or 30 s).
        readiness_timeout: how long ``/health/readiness`` waits for PostgreSQL.
        metrics_registry: the Prometheus registry ``/metrics`` serves (default: the one
            the made router reports into, else ``prometheus_client.REGISTRY``).
        max_body_bytes: the largest request body read (default 8 MiB); a larger one is
            refused with 413 before it is read whole.
    """
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be positive, not {max_body_bytes!r}")
    owns_router = router is None
    if router is None:
        router, made_registry = _default_router(dsn)
        metrics_registry = metrics_registry or made_registry
    gateway = Gateway(
        router,
        keys,
        pool=pool,
        shutdown_timeout=_shutdown_timeout(shutdown_timeout),
        readiness_timeout=readiness_timeout,
        metrics_registry=metrics_registry,
        owns_router=owns_router,
        max_body_bytes=max_body_bytes,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/health/liveness", liveness, methods=["GET"]),
        Route("/health/readiness", readiness, methods=["GET"]),
    ]
    if _metrics_available():
        routes.append(Route("/metrics", metrics, methods=["GET"]))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _unexpected},
    )
    app.state.gateway = gateway
    return app
