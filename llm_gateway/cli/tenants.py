"""``llm-gateway tenants models TENANT_ID``: what a tenant can use, read as the router reads it."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from .._defaults import DEFAULT_DSN
from ._common import EPILOG, get_or_add_group

__all__ = ["register"]


def register(sub: Any) -> None:
    tenants_sub = get_or_add_group(sub, "tenants", "tenant commands")
    models = tenants_sub.add_parser(
        "models",
        help="every provider and model a tenant can be served by now",
        description=(
            "Every provider and model the tenant can be served by now: key source (tenant or"
            " system), context window, price per million tokens, health, its model groups, and"
            " why anything is excluded. Reads the tenant from DATABASE_URL and the providers"
            " from their environment variables, like the process-wide router. Health is this"
            " process's own (a new process has used no key yet)."
        ),
        epilog=EPILOG,
    )
    models.add_argument("tenant_id", metavar="TENANT_ID", help="the tenant's id (a UUID)")
    models.add_argument(
        "--format", choices=["table", "json"], default="table", help="output format (table)"
    )
    models.add_argument("--dsn", help=f"PostgreSQL DSN (default: DATABASE_URL, else {DEFAULT_DSN})")
    models.set_defaults(run=models_command)


async def _listing(dsn: str, tenant_id: str) -> dict[str, Any]:
    from ..router import TenantLLMRouter

    async with TenantLLMRouter(dsn, record_usage=False) as router:
        return await router.list_models(tenant_id)


def _price(row: dict[str, Any]) -> tuple[str, str]:
    prices = row["price_per_m"]
    return ("-", "-") if prices is None else (f"{prices['input']:g}", f"{prices['output']:g}")


def _table(listing: dict[str, Any]) -> str:
    head = ("PROVIDER", "MODEL", "KEY", "CONTEXT", "IN/M", "OUT/M", "HEALTH", "STATUS")
    rows = [head]
    for m in listing["models"]:
        rows.append(
            (
                m["provider"],
                m["model"],
                m["key_source"],
                "-" if m["context_window"] is None else str(m["context_window"]),
                *_price(m),
                m["health"]["state"],
                "ok" if m["available"] else m["reason"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]) for r in rows
    ]
    for group in listing["groups"]:
        lines.append("")
        lines.append(f"group {group['name']} ({group['source']}):")
        for e in group["entries"]:
            status = "ok" if e["available"] else e["reason"]
            lines.append(f"  {e['provider']}/{e['model']}  {status}")
    if listing["excluded"]:
        lines.append("")
        lines.append("excluded:")
        lines.extend(f"  {p}: {reason}" for p, reason in listing["excluded"].items())
    return "\n".join(line.rstrip() for line in lines)


def models_command(args: argparse.Namespace) -> int:
    from ..dsn import dsn_source

    dsn, _ = dsn_source(args.dsn)
    listing = asyncio.run(_listing(dsn, args.tenant_id))
    print(json.dumps(listing, indent=2) if args.format == "json" else _table(listing))
    return 0
