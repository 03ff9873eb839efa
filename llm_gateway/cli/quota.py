"""``llm-gateway quota show``: a tenant's budgets and limits as admission sees them now."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from .._defaults import DEFAULT_DSN
from ..governance.keys import KeyQuota
from ._common import EPILOG

__all__ = ["register"]

COLUMNS = ("scope", "limit", "allowed", "used", "reserved", "remaining", "resets_at")


def register(sub: Any) -> None:
    quota = sub.add_parser(
        "quota",
        help="show a tenant's budgets and limits",
        description="Budgets and rate limits of tenants, read from PostgreSQL.",
        epilog=EPILOG,
    )
    commands = quota.add_subparsers(dest="quota_command", required=True, metavar="COMMAND")
    show = commands.add_parser(
        "show",
        help="one row per configured budget or limit of a tenant",
        description="One row per configured budget or limit of the tenant (and of --user): "
        "allowed, used, reserved (held by requests in flight and by other processes' "
        "leases), remaining, and when it resets. The numbers are fresh from PostgreSQL, as "
        "router.quota_status() gives them. Only the tenant's own inference_config is read: "
        "a service's default_limits= are not known to this command.",
        epilog=EPILOG,
    )
    show.add_argument("tenant_id", metavar="TENANT_ID", help="the tenant's id (a UUID)")
    show.add_argument("--user", metavar="USER_ID", help="also show this user's user_limits")
    show.add_argument(
        "--key", metavar="KEY_ID", help="also show this virtual key's limits (its record id)"
    )
    show.add_argument(
        "--format",
        choices=["table", "json"],
        default="table",
        help="output format (default: %(default)s)",
    )
    show.add_argument("--dsn", help=f"PostgreSQL DSN (default: DATABASE_URL, else {DEFAULT_DSN})")
    show.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    quota = None if args.key is None else _key_quota(args)
    rows = asyncio.run(_status(args.dsn, args.tenant_id, args.user, quota))
    if args.format == "json":
        print(json.dumps([_jsonable(r) for r in rows], indent=2))
    elif not rows:
        print(f"tenant {args.tenant_id} has no budgets or limits")
    else:
        print(_table(rows))
    return 0


async def _status(
    dsn: str | None, tenant_id: str, user_id: str | None, quota: KeyQuota | None
) -> list[dict[str, Any]]:
    from ..router import TenantLLMRouter

    # No usage rows: this process sends no request. Providers come from the environment like
    # the module-level router's, but none is contacted.
    router = TenantLLMRouter(dsn, record_usage=False)
    try:
        return await router.quota_status(tenant_id, user_id, quota)
    finally:
        await router.close()


def _key_quota(args: argparse.Namespace) -> KeyQuota:
    """The quota of the tenant's virtual key ``--key`` (an error naming both if none)."""
    from ..errors import InvalidRequestError
    from .keys import with_key_store

    keys = with_key_store(args, lambda store: store.list(args.tenant_id))
    for key in keys:
        if str(key.id) == args.key.strip().lower():
            return key.quota  # type: ignore[no-any-return]
    raise InvalidRequestError(
        f"tenant {args.tenant_id} has no virtual key {args.key}", parameter="key"
    )


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def _cell(row: dict[str, Any], column: str) -> str:
    value = row[column]
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, float):
        # Money to the micro-dollar; counts (requests, tokens) whole.
        return f"{value:.6f}" if row["limit"] == "max_usd" else f"{value:.0f}"
    return str(value)


def _table(rows: Sequence[dict[str, Any]]) -> str:
    cells = [list(COLUMNS), *([_cell(r, c) for c in COLUMNS] for r in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in cells
    )
