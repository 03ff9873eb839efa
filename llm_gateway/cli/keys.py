"""``llm-gateway keys generate|create|list|revoke`` and ``tenants encrypt|rotate|set-key``.

``keys create|list|revoke`` manage the gateway server's virtual keys
(:mod:`llm_gateway.server.virtual_keys`); a new key is printed once, by ``create``. Tenants'
provider keys are encrypted at rest under the key ring in ``LLM_GATEWAY_KEYRING``
(see :mod:`llm_gateway.secrets`). No command takes a key on its command line: argv is
visible to other users of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from typing import Any

from .._defaults import DEFAULT_DSN
from ._common import EPILOG, get_or_add_group, nonnegative

__all__ = ["register"]

_DSN_HELP = f"PostgreSQL DSN (default: DATABASE_URL, else {DEFAULT_DSN})"
_ARGV_REFUSED = (
    "a key on the command line is refused (argv is visible to other users):"
    " pipe it on stdin or type it at the prompt"
)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def register(sub: Any) -> None:
    keys = sub.add_parser(
        "keys", help="key ring of tenants' encrypted keys", description="Key ring commands."
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    generate = keys_sub.add_parser(
        "generate",
        help="print a new key ring entry",
        description="Print a new key ring entry, <id>:<base64 of 32 random bytes>. Put it"
        " first in LLM_GATEWAY_KEYRING to encrypt with it (keep the old entries after it"
        " until `llm-gateway tenants rotate` has run).",
        epilog=EPILOG,
    )
    generate.add_argument("--id", help="the key id (default: k and 8 random hex digits)")
    generate.set_defaults(run=generate_command)
    _register_virtual_keys(keys_sub)

    tenants = get_or_add_group(sub, "tenants", "tenant configuration")
    for name, rotate, text in (
        ("encrypt", False, "Encrypt every tenant's plaintext API keys under the first key"),
        ("rotate", True, "Re-encrypt every tenant's API keys under the first key"),
    ):
        cmd = tenants.add_parser(
            name,
            help=text[0].lower() + text[1:],
            description=f"{text} of LLM_GATEWAY_KEYRING, in batches. Idempotent, safe to"
            " interrupt and run again, and safe while routers serve traffic (a row edited"
            " meanwhile is read again). A value that does not decrypt is left as it is,"
            " reported, and makes the command exit 1.",
            epilog=EPILOG,
        )
        cmd.add_argument("--dsn", help=_DSN_HELP)
        cmd.add_argument("--batch-size", type=_positive, default=500, help="default 500")
        cmd.add_argument(
            "--format", choices=("text", "json"), default="text", help="summary format"
        )
        cmd.set_defaults(run=reencrypt_command, rotate=rotate)

    set_key = tenants.add_parser(
        "set-key",
        help="encrypt and store one tenant's key for a provider",
        description="Encrypt a tenant's API key for PROVIDER under the first key of"
        " LLM_GATEWAY_KEYRING and store it. The key is read from stdin, or from a prompt"
        " that does not echo; a key given as an argument is refused.",
        epilog=EPILOG,
    )
    set_key.add_argument("tenant_id", metavar="TENANT_ID", help="the tenant's id (uuid)")
    set_key.add_argument("provider", metavar="PROVIDER", help="provider name, e.g. groq")
    set_key.add_argument("--remove", action="store_true", help="remove the provider's key")
    set_key.add_argument("--dsn", help=_DSN_HELP)
    # Caught here, so argparse never echoes a key given by mistake in its error message.
    set_key.add_argument("--key", dest="argv_key", help=argparse.SUPPRESS)
    set_key.add_argument("argv_rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    set_key.set_defaults(run=set_key_command)


def generate_command(args: argparse.Namespace) -> int:
    from ..secrets import generate_entry

    print(generate_entry(args.id))
    return 0


def _keyring() -> Any:
    from ..secrets import KeyRing

    ring = KeyRing.from_env()
    ring.require_active()  # a one-line error naming LLM_GATEWAY_KEYRING
    return ring


def reencrypt_command(args: argparse.Namespace) -> int:
    from ..dsn import connect_checked, dsn_source
    from ..tenant_keys import reencrypt_tenants

    ring = _keyring()
    dsn, check = dsn_source(args.dsn)

    async def run() -> Any:
        conn = await connect_checked(dsn, check=check)
        try:
            return await reencrypt_tenants(
                conn, ring, rotate=args.rotate, batch_size=args.batch_size
            )
        finally:
            await conn.close()

    report = asyncio.run(run())
    for failure in report.failures:
        print(f"llm-gateway: skipped {failure}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps({"key_id": ring.active_id, **report.as_dict()}, indent=2))
    else:
        print(
            f"{report.tenants_written} of {report.tenants_read} tenants written under key"
            f" {ring.active_id!r}: {report.keys_encrypted} keys encrypted,"
            f" {report.keys_rotated} re-encrypted, {report.retries} retried after concurrent"
            f" edits, {len(report.failures)} skipped"
        )
    return 1 if report.failures else 0


def _read_key(prompt: str) -> str | None:
    if sys.stdin is None:
        return None
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    text = sys.stdin.read().strip()
    return None if "\n" in text else text  # several lines: not one key


def set_key_command(args: argparse.Namespace) -> int:
    from ..config import normalize_provider
    from ..dsn import connect_checked, dsn_source
    from ..tenant_keys import set_tenant_keys
    from ..tenant_store import as_tenant_id

    if args.argv_key is not None or args.argv_rest:
        print(f"llm-gateway tenants set-key: {_ARGV_REFUSED}", file=sys.stderr)
        return 2
    tenant_id = as_tenant_id(args.tenant_id)
    provider = normalize_provider(args.provider)
    ring = _keyring()
    key: str | None = None
    if not args.remove:
        key = _read_key(f"{provider} key for tenant {tenant_id}: ")
        if not key or not key.strip():
            print("llm-gateway: no key read (one line on stdin, or at the prompt)", file=sys.stderr)
            return 1
    dsn, check = dsn_source(args.dsn)

    async def run() -> None:
        conn = await connect_checked(dsn, check=check)
        try:
            await set_tenant_keys(conn, ring, tenant_id, {provider: key})
        finally:
            await conn.close()

    asyncio.run(run())
    done = "removed" if key is None else f"stored (encrypted under key {ring.active_id!r})"
    print(f"tenant {tenant_id}: {provider} key {done}")
    return 0


# --- virtual keys of the gateway server ------------------------------------------------------


def _register_virtual_keys(keys_sub: Any) -> None:
    from ..governance.periods import PERIODS

    create = keys_sub.add_parser(
        "create",
        help="create a virtual key (printed once)",
        description="Create a virtual key for a tenant and print it, once: only its keyed hash"
        " is stored. Store it now; it cannot be shown again.",
        epilog=EPILOG,
    )
    create.add_argument("--tenant", required=True, help="the tenant's id (uuid)")
    create.add_argument("--user", help="the tenant's user the key acts for")
    create.add_argument("--name", help="a name for people (e.g. the service using it)")
    create.add_argument(
        "--models", help="comma-separated models or groups it may use (default any)"
    )
    create.add_argument("--max-usd", type=nonnegative, help="its own budget in US dollars")
    create.add_argument("--period", choices=PERIODS, help="budget period (default 1mo)")
    create.add_argument("--rpm", type=_positive, help="requests per minute")
    create.add_argument("--tpm", type=_positive, help="tokens per minute")
    create.add_argument("--rpd", type=_positive, help="requests per day")
    create.add_argument(
        "--expires", type=_instant, help="expiry, ISO 8601 (a date is midnight UTC; default UTC)"
    )
    list_ = keys_sub.add_parser(
        "list",
        help="list virtual keys (never the keys themselves)",
        description="List virtual keys: id, prefix and what each grants; never the key.",
        epilog=EPILOG,
    )
    list_.add_argument("--tenant", help="only this tenant's keys")
    revoke = keys_sub.add_parser(
        "revoke",
        help="revoke a virtual key",
        description="Revoke a virtual key: every server process refuses it on its next"
        " request. Exits 1 when there is no key with this id.",
        epilog=EPILOG,
    )
    revoke.add_argument("key_id", metavar="ID", help="the key's id (from create or list)")
    for cmd, run in ((create, create_command), (list_, list_command), (revoke, revoke_command)):
        cmd.add_argument("--dsn", help=_DSN_HELP)
        if cmd is not revoke:
            cmd.add_argument(
                "--format", choices=("table", "json"), default="table", help="output format"
            )
        cmd.set_defaults(run=run)


def _instant(text: str) -> Any:
    from datetime import UTC, datetime

    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def with_key_store(args: argparse.Namespace, work: Any) -> Any:
    """``await work(store)`` with a store on a small pool of the command's database."""
    from ..dsn import create_pool_checked, dsn_source
    from ..server.virtual_keys import VirtualKeyStore

    dsn, check = dsn_source(args.dsn)

    async def run() -> Any:
        pool = await create_pool_checked(dsn, check=check, min_size=1, max_size=2)
        try:
            return await work(VirtualKeyStore(pool, notify=False))
        finally:
            await pool.close()

    return asyncio.run(run())


def create_command(args: argparse.Namespace) -> int:
    from ..errors import VirtualKeySpecError

    limits = {
        name: value
        for name, value in (
            ("max_usd", args.max_usd),
            ("period", args.period),
            ("requests_per_minute", args.rpm),
            ("tokens_per_minute", args.tpm),
            ("requests_per_day", args.rpd),
        )
        if value is not None
    }
    models = None if args.models is None else [m.strip() for m in args.models.split(",")]
    try:
        raw, key = with_key_store(
            args,
            lambda store: store.create(
                args.tenant,
                user_id=args.user,
                name=args.name,
                models=models,
                limits=limits or None,
                expires_at=args.expires,
            ),
        )
    except VirtualKeySpecError as exc:
        print(f"llm-gateway keys create: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps({"key": raw, **key.as_dict()}, indent=2))
    else:
        print(f"key: {raw}")
        print("(shown once: store it now, it cannot be shown again)")
        for name, value in key.as_dict().items():
            if value is not None:
                print(f"{name}: {_cell(value)}")
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


_LIST_COLUMNS = (
    "id",
    "prefix",
    "tenant_id",
    "user_id",
    "name",
    "models",
    "limits",
    "expires_at",
    "revoked_at",
    "created_at",
)


def list_command(args: argparse.Namespace) -> int:
    keys = with_key_store(args, lambda store: store.list(args.tenant))
    rows = [key.as_dict() for key in keys]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    table = [list(_LIST_COLUMNS)] + [[_cell(r[c]) for c in _LIST_COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_LIST_COLUMNS))]
    for line in table:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    return 0


def revoke_command(args: argparse.Namespace) -> int:
    if not with_key_store(args, lambda store: store.revoke(args.key_id)):
        print(f"llm-gateway: no virtual key with id {args.key_id[:40]!r}", file=sys.stderr)
        return 1
    print(f"virtual key {args.key_id} revoked")
    return 0
