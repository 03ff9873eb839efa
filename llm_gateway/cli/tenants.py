"""``llm-gateway tenants list|show|explain|models``: tenants as the router reads them.

Keys are never printed: a key is shown by its deployment fingerprint
(:meth:`TenantLLMRouter.key_fingerprint`), the one health, ``explain()`` and usage rows show.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from .._defaults import DEFAULT_DSN
from ._common import EPILOG, add_format, get_or_add_group, print_json, print_table

if TYPE_CHECKING:
    from ..router import TenantLLMRouter

__all__ = ["register"]

_DSN_HELP = f"PostgreSQL DSN (default: DATABASE_URL, else {DEFAULT_DSN})"
_GOVERNANCE = ("budget", "limits", "user_limits", "system_keys")
T = TypeVar("T")


def _tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 0")
    return value


def register(sub: Any) -> None:
    tenants_sub = get_or_add_group(sub, "tenants", "tenant commands")
    listing = tenants_sub.add_parser(
        "list",
        help="every tenant: providers with keys, preferred provider, governance",
        description="Every tenant: its id and name, the providers it has keys for, its"
        " preferred provider, which governance sections (budget, limits, user_limits,"
        " system_keys) it sets, and whether its configuration is valid. Read from"
        " PostgreSQL; no key is decrypted or printed.",
        epilog=EPILOG,
    )
    add_format(listing)
    listing.add_argument("--dsn", help=_DSN_HELP)
    listing.set_defaults(run=list_command)

    show = tenants_sub.add_parser(
        "show",
        help="a tenant's configuration as the router sees it (keys as fingerprints)",
        description="The tenant's configuration as the router validates it (every setting,"
        " defaults filled in), its keys shown as fingerprints, and for each provider of the"
        " environment which key a request would use or why none. Providers come from their"
        " environment variables, like the process-wide router; a service's own router"
        " arguments (default_limits=, model_groups=) are not known to this command.",
        epilog=EPILOG,
    )
    show.add_argument("tenant_id", metavar="TENANT_ID", help="the tenant's id (a UUID)")
    add_format(show)
    show.add_argument("--dsn", help=_DSN_HELP)
    show.set_defaults(run=show_command)

    explain = tenants_sub.add_parser(
        "explain",
        help="the chain a request would use now, with scores and exclusions",
        description="The chain a request of the tenant would try now, in order, with each"
        " entry's score, and why every other provider is left out (router.explain()). Health"
        " is this process's own: a new process has seen no failure, so no breaker is open.",
        epilog=EPILOG,
    )
    explain.add_argument("tenant_id", metavar="TENANT_ID", help="the tenant's id (a UUID)")
    explain.add_argument("--model", help="a model or model group name, as model= of a request")
    explain.add_argument(
        "--tokens", type=_tokens, default=None, help="estimated tokens of the request (100)"
    )
    add_format(explain)
    explain.add_argument("--dsn", help=_DSN_HELP)
    explain.set_defaults(run=explain_command)

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


def _with_router(args: argparse.Namespace, work: Callable[[TenantLLMRouter], Awaitable[T]]) -> T:
    """``work(router)`` on a router that records nothing and listens for nothing."""
    from ..dsn import dsn_source
    from ..router import TenantLLMRouter

    dsn, _ = dsn_source(args.dsn)

    async def run() -> T:
        async with TenantLLMRouter(dsn, record_usage=False, config_notify=False) as router:
            return await work(router)

    return asyncio.run(run())


# --- list ------------------------------------------------------------------------------------


def tenant_summary(row: Mapping[str, Any]) -> dict[str, Any]:
    """One tenant row, summarised without decrypting anything; a config the router would
    refuse is reported in ``config_error`` (the first offending field and why)."""
    import orjson
    from pydantic import ValidationError

    from ..config import InferenceConfig, normalize_provider
    from ..errors import UnknownProviderError

    error: str | None = None
    tokens = orjson.loads(row["llm_tokens"] or "{}")
    raw = orjson.loads(row["inference_config"] or "{}")
    providers: list[str] = []
    if isinstance(tokens, dict):
        for name, value in tokens.items():
            if value is None:
                continue
            try:
                providers.append(normalize_provider(name))
            except UnknownProviderError:
                error = error or "llm_tokens: unknown provider name"
    else:
        error = "llm_tokens: not a JSON object"
    preferred = None
    governance: list[str] = []
    if isinstance(raw, dict):
        governance = [s for s in _GOVERNANCE if raw.get(s) is not None]
        try:
            inference = InferenceConfig.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            path = ".".join(str(p) for p in ("inference_config", *first["loc"]))
            error = error or f"{path}: {first['msg']}"
        else:
            preferred = inference.preferred_provider
    else:
        error = error or "inference_config: not a JSON object"
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "providers": sorted(set(providers)),
        "preferred_provider": preferred,
        "governance": governance,
        "config_error": error,
        "updated_at": None if row["updated_at"] is None else row["updated_at"].isoformat(),
    }


_LIST_QUERY = (
    "SELECT id, name, llm_tokens::text AS llm_tokens,"
    " inference_config::text AS inference_config, updated_at FROM tenants ORDER BY name, id"
)


def list_command(args: argparse.Namespace) -> int:
    from ..dsn import connect_checked, dsn_source

    dsn, check = dsn_source(args.dsn)

    async def run() -> list[dict[str, Any]]:
        conn = await connect_checked(dsn, check=check)
        try:
            return [tenant_summary(dict(r)) for r in await conn.fetch(_LIST_QUERY)]
        finally:
            await conn.close()

    tenants = asyncio.run(run())
    if args.format == "json":
        print_json({"tenants": tenants})
        return 0
    print_table(
        f"{len(tenants)} tenant(s)",
        ("ID", "NAME", "KEYS", "PREFERRED", "GOVERNANCE", "CONFIG"),
        [
            (
                t["id"],
                t["name"],
                ",".join(t["providers"]) or "-",
                t["preferred_provider"],
                ",".join(t["governance"]) or "-",
                "ok" if t["config_error"] is None else f"invalid: {t['config_error']}",
            )
            for t in tenants
        ],
    )
    return 0


# --- show ------------------------------------------------------------------------------------


async def tenant_view(router: TenantLLMRouter, tenant_id: str) -> dict[str, Any]:
    """The tenant's config as ``router`` uses it, JSON-ready, keys as fingerprints."""
    config = await router.tenant_config(tenant_id)
    excluded = (await router.list_models(tenant_id))["excluded"]
    inference = config.inference
    providers: dict[str, dict[str, Any]] = {}
    from ..providers import settings_from_env

    # The router of this command was built from the environment too (no providers= given).
    for name, settings in settings_from_env().items():
        key = config.keys.get(name)
        if key is None and inference.use_system_keys:
            key = settings.api_key
        source: str | None = None if key is None else key.source
        if key is None and not settings.requires_key:
            source = "none"
        providers[name] = {
            "base_url": settings.base_url,
            "key_source": source,
            "key_fingerprint": None if key is None else router.key_fingerprint(key),
            "excluded": excluded.get(name),
        }
    return {
        "tenant_id": str(config.tenant_id),
        "name": config.name,
        "found": config.found,
        "updated_at": None if config.updated_at is None else config.updated_at.isoformat(),
        "keys": {p: router.key_fingerprint(k) for p, k in sorted(config.keys.items())},
        "providers": providers,
        "inference_config": inference.model_dump(mode="json"),
    }


def _compact(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))


def show_command(args: argparse.Namespace) -> int:
    view = _with_router(args, lambda router: tenant_view(router, args.tenant_id))
    if args.format == "json":
        print_json(view)
        return 0
    head = [("tenant_id", view["tenant_id"]), ("name", view["name"])]
    head.append(("updated_at", view["updated_at"]))
    settings = [(k, _compact(v)) for k, v in view["inference_config"].items()]
    print_table(f"tenant {view['tenant_id']}", ("SETTING", "VALUE"), [*head, *settings])
    print_table(
        "providers (keys as fingerprints)",
        ("PROVIDER", "BASE_URL", "KEY", "FINGERPRINT", "STATUS"),
        [
            (name, p["base_url"], p["key_source"], p["key_fingerprint"], p["excluded"] or "ok")
            for name, p in view["providers"].items()
        ],
    )
    return 0


# --- explain ---------------------------------------------------------------------------------


def explain_command(args: argparse.Namespace) -> int:
    explained = _with_router(
        args, lambda router: router.explain(args.tenant_id, args.tokens, args.model)
    )
    if args.format == "json":
        print_json(explained)
        return 0
    what = f", model {args.model}" if args.model else ""
    print_table(
        f"chain of tenant {explained['tenant_id']}{what}",
        ("#", "PROVIDER", "MODEL", "KEY", "FINGERPRINT", "SCORE"),
        [
            (i, c["provider"], c["model"], c["key_source"], c["key_fingerprint"], c["score"])
            for i, c in enumerate(explained["chain"], 1)
        ],
        right=("#", "SCORE"),
    )
    if explained["excluded"]:
        print_table("excluded", ("PROVIDER", "REASON"), sorted(explained["excluded"].items()))
    return 0


# --- models ----------------------------------------------------------------------------------


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
