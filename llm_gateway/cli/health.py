"""``llm-gateway health``: probe every configured provider with one cheap request.

A provider is configured when it has a key: a system key from its environment variable, or
(with ``--tenant``) one of the tenant's keys; a keyless ``local`` server counts too. Each
(provider, key) pair gets one ``GET /models``; where the provider does not serve it (404,
405), a one-token completion instead. Nothing is written anywhere, and without ``--tenant``
the database is not contacted at all.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from .._defaults import DEFAULT_DSN
from ._common import (
    CHECK_EPILOG,
    EXIT_OK,
    EXIT_UNHEALTHY,
    add_format,
    nonnegative,
    print_json,
    print_table,
)

if TYPE_CHECKING:
    from ..keys import ApiKey
    from ..providers import ProviderSettings

__all__ = ["Target", "probe", "register", "targets"]

COLUMNS = ("provider", "base_url", "key_source", "status", "latency_ms", "error", "probe")
_NOT_SERVED = (404, 405)  # no /models here: fall back to a completion


def register(sub: Any) -> None:
    health = sub.add_parser(
        "health",
        help="probe each configured provider; exit 1 when any is down",
        description="Probe each configured provider (system keys from the environment and,"
        " with --tenant, that tenant's keys) with GET /models, or a one-token completion"
        " where /models is not served. Prints provider, base URL, key source, status (up,"
        " down, skipped: no key), latency and error. Exits 1 when any probed provider is"
        " down, or when none has a key.",
        epilog=CHECK_EPILOG,
    )
    health.add_argument("--tenant", metavar="TENANT_ID", help="also probe this tenant's keys")
    health.add_argument(
        "--probe",
        choices=("auto", "models", "completion"),
        default="auto",
        help="auto: GET /models, a completion where it is not served (default: auto)",
    )
    health.add_argument(
        "--timeout", type=_seconds, default=10.0, help="seconds per probe (default: 10)"
    )
    add_format(health)
    health.add_argument(
        "--dsn", help=f"PostgreSQL DSN for --tenant (default: DATABASE_URL, else {DEFAULT_DSN})"
    )
    health.set_defaults(run=health_command)


def _seconds(text: str) -> float:
    value = nonnegative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not > 0")
    return value


@dataclass(frozen=True, slots=True)
class Target:
    """One provider and the key to probe it with (``None``: skipped, ``reason`` says why)."""

    provider: str
    settings: ProviderSettings | None
    key: ApiKey | None
    key_source: str | None
    reason: str | None = None


def targets(
    settings: dict[str, ProviderSettings], tenant_keys: dict[str, ApiKey] | None = None
) -> list[Target]:
    """What to probe: each provider's system key, then the tenant's key; keyless providers
    that need a key are listed as skipped."""
    found: list[Target] = []
    tenant_keys = tenant_keys or {}
    for name, s in settings.items():
        mine = [Target(name, s, s.api_key, "system")] if s.api_key is not None else []
        if name in tenant_keys:
            mine.append(Target(name, s, tenant_keys[name], "tenant"))
        if not mine and not s.requires_key:
            mine.append(Target(name, s, None, "none"))
        found.extend(mine or [Target(name, s, None, None, "no key configured")])
    for name in sorted(set(tenant_keys) - set(settings)):
        found.append(Target(name, None, None, "tenant", "no base URL in this environment"))
    return found


def _models_url(settings: ProviderSettings) -> str:
    # The groq SDK's base URL is the host; its API lives under /openai/v1 (see providers/groq).
    return settings.base_url + ("/openai/v1/models" if settings.family == "groq" else "/models")


async def _get_models(target: Target, timeout: float) -> tuple[int | None, str | None]:
    """(HTTP status, error); the error never quotes the provider's body (it may echo a key)."""
    import httpx

    assert target.settings is not None
    headers = {} if target.key is None else {"Authorization": f"Bearer {target.key.reveal()}"}
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            response = await client.get(_models_url(target.settings), headers=headers)
    except httpx.TimeoutException:
        return None, f"timed out after {timeout:g} s"
    except httpx.HTTPError as exc:
        return None, f"connection error ({type(exc).__name__})"
    code = response.status_code
    if code != 200:
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "unknown status"
        return code, f"HTTP {code} {phrase}"
    try:
        data = response.json().get("data")
    except (ValueError, AttributeError):
        data = None
    if not isinstance(data, list):  # a 200 of the wrong shape (a proxy's page) is no answer
        return code, "unexpected response (not a model list)"
    return code, None


async def _complete(target: Target, timeout: float) -> str | None:
    from ..errors import EmptyResponseError, GatewayError
    from ..providers import create_provider

    assert target.settings is not None
    provider = create_provider(target.settings)
    try:
        await provider.complete(
            key=target.key,
            model=target.settings.default_model,
            messages=[{"role": "user", "content": "ping"}],
            params={"max_tokens": 1},
            timeout=timeout,
        )
    except EmptyResponseError:
        return None  # it answered, with nothing in one token: reachable and authorised
    except GatewayError as exc:  # classified, key scrubbed
        return f"{type(exc).__name__}: {exc}"
    finally:
        await provider.aclose()
    return None


async def probe(target: Target, mode: str = "auto", timeout: float = 10.0) -> dict[str, Any]:
    """One row of the health table (see :data:`COLUMNS`)."""
    row: dict[str, Any] = {
        "provider": target.provider,
        "base_url": None if target.settings is None else target.settings.base_url,
        "key_source": target.key_source,
        "status": "skipped",
        "latency_ms": None,
        "error": target.reason,
        "probe": None,
    }
    if target.reason is not None:
        return row
    error: str | None = None
    started = time.perf_counter()
    if mode != "completion":
        row["probe"] = "models"
        code, error = await _get_models(target, timeout)
        if mode == "auto" and code in _NOT_SERVED:
            mode = "completion"
            started = time.perf_counter()
    if mode == "completion":
        row["probe"] = "completion"
        error = await _complete(target, timeout)
    row["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    row["status"] = "down" if error else "up"
    row["error"] = error
    return row


async def _tenant_keys(dsn_arg: str | None, tenant_id: str) -> dict[str, ApiKey]:
    from ..dsn import dsn_source
    from ..router import TenantLLMRouter

    dsn, _ = dsn_source(dsn_arg)
    async with TenantLLMRouter(dsn, record_usage=False, config_notify=False) as router:
        return dict((await router.tenant_config(tenant_id)).keys)


def health_command(args: argparse.Namespace) -> int:
    import sys

    from ..providers import settings_from_env

    async def run() -> list[dict[str, Any]]:
        keys = None if args.tenant is None else await _tenant_keys(args.dsn, args.tenant)
        found = targets(settings_from_env(), keys)
        return list(await asyncio.gather(*(probe(t, args.probe, args.timeout) for t in found)))

    rows = asyncio.run(run())
    probed = [r for r in rows if r["status"] != "skipped"]
    ok = bool(probed) and all(r["status"] == "up" for r in probed)
    if args.format == "json":
        print_json({"ok": ok, "providers": rows})
    else:
        print_table(
            None,
            ("PROVIDER", "BASE_URL", "KEY", "STATUS", "LATENCY_MS", "ERROR"),
            [[r[c] for c in COLUMNS[:-1]] for r in rows],
            right=("LATENCY_MS",),
        )
    if not probed:
        print("llm-gateway: no provider has a key to probe", file=sys.stderr)
    return EXIT_OK if ok else EXIT_UNHEALTHY
