"""``llm-gateway keys generate`` and ``llm-gateway tenants encrypt|rotate|set-key``.

Tenants' provider keys are encrypted at rest under the key ring in ``LLM_GATEWAY_KEYRING``
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
from ._common import EPILOG, get_or_add_group

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
