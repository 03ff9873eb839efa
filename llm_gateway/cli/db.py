"""``llm-gateway db migrate``: apply the SQL migrations."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from .._defaults import DEFAULT_DSN
from ._common import EPILOG

__all__ = ["register"]


def register(sub: Any) -> None:
    db = sub.add_parser("db", help="database schema", description="Database schema commands.")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    migrate = db_sub.add_parser(
        "migrate",
        help="apply the SQL migrations",
        description="Apply the SQL migrations not yet applied, each once, in order.",
        epilog=EPILOG,
    )
    migrate.add_argument(
        "--dsn", help=f"PostgreSQL DSN (default: DATABASE_URL, else {DEFAULT_DSN})"
    )
    migrate.set_defaults(run=migrate_command)


def migrate_command(args: argparse.Namespace) -> int:
    from ..dsn import dsn_source
    from ..migrate import apply_migrations

    dsn, check = dsn_source(args.dsn)
    applied = asyncio.run(apply_migrations(dsn, check=check))
    print(f"applied migrations: {applied}" if applied else "schema is up to date")
    return 0
