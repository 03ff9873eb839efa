"""``llm-gateway demo``: two tenants, three simulated providers, a failover, a usage report.

The demo writes into a database of its own (``llm_gateway_demo``, or ``LLM_GATEWAY_DEMO_DATABASE``)
on the server named by ``--dsn``, ``DATABASE_URL`` or the local default, creating it if absent.
Only when that default is unreachable (nothing listens) does it start an embedded PostgreSQL.
"""

from __future__ import annotations

import itertools
import os
import re
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from .dsn import DatabaseConnectError, connect_checked, dsn_source, mask_dsn, with_database
from .embedded import start_embedded
from .errors import ConfigError, DatabaseError
from .migrate import apply_migrations
from .providers import provider_settings
from .router import TenantLLMRouter
from .simulator import SimulatedProvider
from .types import CompletionResult

__all__ = ["DEMO_DATABASE", "Database", "find_database", "run_demo"]

#: The demo's own database, created on the chosen server if absent.
DEMO_DATABASE = "llm_gateway_demo"

USAGE_QUERY = """
SELECT provider, model_name, status, key_source, COUNT(*) AS attempts,
       COALESCE(SUM(input_tokens), 0) AS tokens_in, COALESCE(SUM(output_tokens), 0) AS tokens_out,
       COALESCE(SUM(estimated_cost_usd), 0) AS cost_usd, AVG(latency_ms) AS avg_latency_ms
FROM model_usage_stats WHERE tenant_id = $1 AND timestamp >= NOW() - INTERVAL '24 hours'
GROUP BY provider, model_name, status, key_source ORDER BY provider, status
"""
COLUMNS = [
    "provider",
    "model_name",
    "status",
    "key_source",
    "attempts",
    "tokens_in",
    "tokens_out",
    "cost_usd",
    "avg_latency_ms",
]


@dataclass(frozen=True, slots=True)
class Database:
    """The server the demo uses: an admin DSN on it, what to check, and the embedded data dir."""

    admin_dsn: str
    check: str
    embedded_data: Path | None = None


async def find_database(dsn: str | None) -> Database:
    """The server to use: ``dsn``, ``DATABASE_URL``, the local default, else an embedded one.

    Only an unreachable default leads to the embedded server; any other failure (timeout,
    authentication, missing database, or an explicit DSN that does not answer) is raised as a
    :class:`DatabaseConnectError` naming its cause and what to check.
    """
    chosen, check = dsn_source(dsn)
    try:
        conn = await connect_checked(chosen, check=check)
    except DatabaseConnectError as exc:
        explicit = bool(dsn or os.environ.get("DATABASE_URL"))
        if explicit or exc.kind != "unreachable":
            raise
        uri, data = start_embedded(f"No PostgreSQL reachable at {mask_dsn(chosen)}")
        return Database(uri, "the embedded server's log", data)
    await conn.close()
    return Database(chosen, check)


def _demo_database_name() -> str:
    name = os.environ.get("LLM_GATEWAY_DEMO_DATABASE") or DEMO_DATABASE
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ConfigError(f"LLM_GATEWAY_DEMO_DATABASE={name!r} is not a plain lowercase name")
    return name


async def ensure_demo_database(db: Database, name: str) -> tuple[str, bool]:
    """The DSN of database ``name`` on ``db``'s server, created if absent; and if it was."""
    conn = await connect_checked(db.admin_dsn, check=db.check)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return with_database(db.admin_dsn, name), False
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.DuplicateDatabaseError:
            return with_database(db.admin_dsn, name), False  # another demo created it just now
        except asyncpg.PostgresError as exc:
            raise DatabaseError(
                f"cannot create the demo database {name!r} on {mask_dsn(db.admin_dsn)} ({exc}):"
                f" create it, or use a role allowed to (CREATEDB) in {db.check}"
            ) from exc
        return with_database(db.admin_dsn, name), True
    finally:
        await conn.close()


def _show(value: object) -> str:
    if isinstance(value, Decimal | float) and not isinstance(value, bool):
        return f"{value:.6f}" if isinstance(value, Decimal) else f"{value:.1f}"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` as aligned text; the last row (the total) below a rule."""
    cells = [[_show(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    lines += [*body[:-1], lines[1], body[-1]]  # the last row is the total
    return "\n".join("    " + line for line in lines)


def _usage_rows(records: list[asyncpg.Record]) -> list[dict[str, Any]]:
    """The per-group rows with exact costs, then a total row (the sum of the rows above)."""
    rows = [dict(r) | {"avg_latency_ms": float(r["avg_latency_ms"])} for r in records]
    total: dict[str, Any] = dict.fromkeys(COLUMNS, "")
    total["provider"] = "total"
    for key in ("attempts", "tokens_in", "tokens_out"):
        total[key] = sum(r[key] for r in rows)
    total["cost_usd"] = sum((r["cost_usd"] for r in rows), Decimal(0))
    return [*rows, total]


def _why(result: CompletionResult, tenant: str) -> list[str]:
    """Why the request was served the way it was: failover causes, system-key fallback."""
    notes = []
    for attempt, following in itertools.pairwise(result.attempts):
        code = f"HTTP {attempt.status_code}, " if attempt.status_code is not None else ""
        notes.append(
            f"failover: {attempt.provider} failed ({code}{attempt.error_class or attempt.outcome})"
            f" after {attempt.latency * 1000:.0f} ms, so the request failed over to"
            f" {following.provider}"
        )
    if result.key_source == "system":
        notes.append(
            f"fallback: {tenant} has no {result.provider} key of its own, so the system key"
            f" was used"
        )
    return notes


async def _make_tenant(conn: asyncpg.Connection, name: str, tokens: str, config: str) -> uuid.UUID:
    tid = uuid.uuid4()
    await conn.execute(
        "INSERT INTO tenants (id, name, llm_tokens, inference_config)"
        " VALUES ($1, $2, $3::jsonb, $4::jsonb)",
        tid,
        name,
        tokens,
        config,
    )
    return tid


async def run_demo(dsn: str | None = None) -> int:
    """Run the demo against ``dsn`` (else ``DATABASE_URL``, the default, an embedded server)."""
    name = _demo_database_name()
    db = await find_database(dsn)
    demo_dsn, created = await ensure_demo_database(db, name)
    print(f"PostgreSQL: {mask_dsn(demo_dsn)} (database {name}{', created' if created else ''})")
    applied = await apply_migrations(demo_dsn, check=db.check)
    print(f"Migrations applied: {applied or 'none needed'}")

    groq = SimulatedProvider(name="groq-sim", model="llama-3.3-70b-versatile")
    openrouter = SimulatedProvider(name="openrouter-sim", fail_with="503")
    llm7 = SimulatedProvider(name="llm7-sim", model="gpt-4o-mini")
    async with groq, openrouter, llm7:
        providers = {
            "groq": provider_settings("groq", groq.root_url, api_key="gsk-SYSTEM-demo-key"),
            "openrouter": provider_settings("openrouter", openrouter.base_url),
            "llm7": provider_settings("llm7", llm7.base_url, api_key="llm7-SYSTEM-demo-key"),
        }
        print("\nSimulated providers (real HTTP on loopback):")
        print(f"    groq        {groq.root_url}   healthy, system key set")
        print(f"    openrouter  {openrouter.base_url}   answers 503 to everything, no system key")
        print(f"    llm7        {llm7.base_url}   healthy, system key set")

        conn = await connect_checked(demo_dsn, check=db.check)
        try:
            acme = await _make_tenant(
                conn,
                "Acme (demo)",
                '{"OpenRouter (DeepSeek R1)": "sk-or-ACME-own-key", "groq": "gsk-ACME-own-key"}',
                '{"preferred_provider": "openrouter", "auto_failover": true,'
                ' "preferred_models": {"groq": "llama-3.3-70b-versatile"}}',
            )
            globex = await _make_tenant(
                conn,
                "Globex (demo)",
                "{}",
                '{"preferred_provider": "llm7", "auto_failover": true}',
            )
        finally:
            await conn.close()
        print("\nTenants:")
        print(f"    Acme    {acme}  own keys for openrouter and groq, prefers openrouter")
        print(f"    Globex  {globex}  no keys of its own, prefers llm7")

        print("\nRequests (tokens in/out, cost in USD, latency of the whole request in ms):")
        async with TenantLLMRouter(demo_dsn, providers=providers) as router:
            for tenant, label in ((acme, "Acme"), (globex, "Globex")):
                for i in range(3):
                    result = await router.complete_for_tenant(
                        tenant,
                        [{"role": "user", "content": f"Hello from {label}, request {i + 1}"}],
                        endpoint="/demo/chat",
                        user_id=f"{label.lower()}-user",
                    )
                    cost = "unknown" if result.cost is None else f"${result.cost:.6f}"
                    print(
                        f"    {label:<7} #{i + 1}  served by {result.provider}/{result.model}"
                        f"  key={result.key_source}  tokens in={result.tokens_input}"
                        f" out={result.tokens_output}  cost={cost}"
                        f"  latency={result.latency * 1000:.1f} ms"
                    )
                    for note in _why(result, label):
                        print(f"            {note}")
                    print(f"            answer: {result.content!r}")
        # close() above drained the usage writer: every attempt is in PostgreSQL now.

        print("\nKeys each simulator received (from the Authorization header):")
        for sim in (openrouter, groq, llm7):
            print(f"    {sim.name:<15} {sorted(set(sim.keys_seen()))}")

    conn = await connect_checked(demo_dsn, check=db.check)
    try:
        for tenant, label in ((acme, "Acme"), (globex, "Globex")):
            print(
                f"\nUsage of {label}, last 24 h, one row per attempt group (model_usage_stats;"
                " failed attempts carry no tokens and no cost):"
            )
            print(_table(_usage_rows(await conn.fetch(USAGE_QUERY, tenant)), COLUMNS))
    finally:
        await conn.close()
    print()
    if db.embedded_data is not None:
        print(
            f"The embedded PostgreSQL stops when the demo exits. Its data, database {name}"
            f" included, stays in {db.embedded_data} for the next run; delete that folder"
            " to remove it."
        )
    else:
        print(
            f"Everything the demo wrote (tenants and usage rows) is in database {name};"
            f" remove it all with DROP DATABASE {name}; on {mask_dsn(db.admin_dsn)}"
        )
    return 0
