"""``llm-gateway serve``: the OpenAI-compatible gateway server on uvicorn (extra ``server``)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ._common import EPILOG, nonnegative, port

__all__ = ["register"]

_FACTORY = "llm_gateway.server.app:create_app"


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def register(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible gateway server",
        description="Serve POST /v1/chat/completions, GET /v1/models, /health/liveness, "
        "/health/readiness (and /metrics with the metrics extra) for callers holding a "
        "virtual key. PostgreSQL from DATABASE_URL, providers from their environment "
        "variables. SIGTERM stops accepting, lets requests in flight finish (at most "
        "--shutdown-timeout seconds) and writes the queued usage rows.",
        epilog=EPILOG,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address (default: %(default)s)")
    serve.add_argument("--port", type=port, default=8080, help="TCP port (default: %(default)s)")
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="worker processes sharing the port; they share only PostgreSQL (default: %(default)s)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=nonnegative,
        default=30.0,
        metavar="SECONDS",
        help="how long requests in flight may run on after SIGTERM (default: %(default)s)",
    )
    serve.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="info",
        help="uvicorn's log level (default: %(default)s)",
    )
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        print(
            "llm-gateway: serve needs the server extra: pip install 'llm-gateway[server]'",
            file=sys.stderr,
        )
        return 1
    from ..server.app import SHUTDOWN_TIMEOUT_ENV

    # Workers are separate processes that build the app from the environment.
    os.environ[SHUTDOWN_TIMEOUT_ENV] = str(args.shutdown_timeout)
    uvicorn.run(
        _FACTORY,
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        lifespan="on",
        timeout_graceful_shutdown=int(args.shutdown_timeout + 0.999),
        log_level=args.log_level,
    )
    return 0
