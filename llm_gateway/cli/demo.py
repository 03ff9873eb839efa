"""``llm-gateway demo``: route requests for two tenants through simulated providers."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from .._defaults import DEFAULT_DSN
from ._common import EPILOG

__all__ = ["register"]


def register(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="route requests for two tenants through simulators",
        description="Route requests for two tenants through three simulated providers "
        "and print the usage report read back from PostgreSQL, each tenant's month by "
        "provider and model, and a model-switch recommendation.",
        epilog=EPILOG,
    )
    demo.add_argument(
        "--dsn",
        help=f"PostgreSQL DSN (default: DATABASE_URL, else {DEFAULT_DSN}, else an embedded "
        "server when the 'embedded' extra is installed)",
    )
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return asyncio.run(run_demo(args.dsn))
