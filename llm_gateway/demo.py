"""``llm-gateway demo``: two tenants, three simulated providers, a failover, a usage report."""

from __future__ import annotations

import os
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from usage.tracker import resolve_dsn

from .errors import DatabaseError
from .migrate import apply_migrations
from .providers import provider_settings
from .router import DEFAULT_DSN, TenantLLMRouter
from .simulator import SimulatedProvider

__all__ = ["find_database", "run_demo"]

USAGE_QUERY = """
SELECT provider, model_name, COUNT(*) as requests, SUM(total_tokens) as tokens,
       SUM(estimated_cost_usd) as cost_usd, AVG(latency_ms) as avg_latency
FROM model_usage_stats WHERE tenant_id = $1 AND timestamp >= NOW() - INTERVAL '24 hours'
GROUP BY provider, model_name ORDER BY requests DESC
"""
STATUS_QUERY = """
SELECT provider, status, key_source, COUNT(*) AS rows
FROM model_usage_stats WHERE tenant_id = $1
GROUP BY provider, status, key_source ORDER BY provider, status
"""


async def _reachable(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def _embedded_dsn() -> str:
    """Start the embedded PostgreSQL of the ``pgserver`` extra, or say what to do instead."""
    try:
        import pgserver
    except ImportError:
        raise DatabaseError(
            "no PostgreSQL reachable. Set DATABASE_URL (default "
            f"{DEFAULT_DSN}), start a server, or `pip install 'llm-gateway[embedded]'` "
            "for an embedded one."
        ) from None
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # As root, pgserver creates a system user and changes folder permissions.
        raise DatabaseError(
            "no PostgreSQL reachable, and the embedded server is not started as root. "
            "Start PostgreSQL or set DATABASE_URL."
        )
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    data = cache / "llm-gateway" / "pgdata"
    data.mkdir(parents=True, exist_ok=True)
    print(f"No PostgreSQL reachable: starting an embedded one in {data}")
    server = pgserver.get_server(str(data))
    return str(server.get_uri())


async def find_database(dsn: str | None) -> str:
    """The DSN to use: ``dsn``, ``DATABASE_URL``, the local default, else an embedded server."""
    chosen = resolve_dsn(dsn)
    if await _reachable(chosen):
        return chosen
    if dsn or os.environ.get("DATABASE_URL"):
        raise DatabaseError(f"cannot connect to PostgreSQL at {chosen}: check DATABASE_URL")
    return _embedded_dsn()


def _table(rows: list[asyncpg.Record] | list[dict[str, Any]], columns: list[str]) -> str:
    def show(value: object) -> str:
        if value is None:
            return ""
        if isinstance(value, Decimal) and value == value.to_integral_value():
            return str(value.quantize(Decimal(1)))
        if isinstance(value, Decimal) and value.as_tuple().exponent < -6:  # type: ignore[operator]
            return f"{value:.1f}"
        return str(value)

    cells = [[show(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join("    " + line for line in lines)


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
    dsn = await find_database(dsn)
    print(f"PostgreSQL: {dsn}")
    applied = await apply_migrations(dsn)
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

        conn = await asyncpg.connect(dsn)
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

        print("\nRequests:")
        async with TenantLLMRouter(dsn, providers=providers) as router:
            for tenant, label in ((acme, "Acme"), (globex, "Globex")):
                for i in range(3):
                    result = await router.complete_for_tenant(
                        tenant,
                        [{"role": "user", "content": f"Hello from {label}, request {i + 1}"}],
                        endpoint="/demo/chat",
                        user_id=f"{label.lower()}-user",
                    )
                    path = " -> ".join(f"{a.provider}:{a.outcome}" for a in result.attempts)
                    print(
                        f"    {label:<7} {result.provider:<10} key={result.key_source:<6}"
                        f" tokens={result.tokens_input}/{result.tokens_output}"
                        f" cost=${result.cost}  attempts: {path}"
                    )
                    print(f"            answer: {result.content!r}")
        # close() above drained the usage writer: every attempt is in PostgreSQL now.

        print("\nKeys each simulator received (from the Authorization header):")
        for sim in (openrouter, groq, llm7):
            print(f"    {sim.name:<15} {sorted(set(sim.keys_seen()))}")

    conn = await asyncpg.connect(dsn)
    try:
        for tenant, label in ((acme, "Acme"), (globex, "Globex")):
            print(f"\nUsage of {label}, last 24 h (the operator query, from model_usage_stats):")
            rows = await conn.fetch(USAGE_QUERY, tenant)
            print(
                _table(
                    rows,
                    ["provider", "model_name", "requests", "tokens", "cost_usd", "avg_latency"],
                )
            )
            print(f"\n  Rows by status and key source for {label}:")
            print(
                _table(
                    await conn.fetch(STATUS_QUERY, tenant),
                    ["provider", "status", "key_source", "rows"],
                )
            )
    finally:
        await conn.close()
    print("\nDemo tenants are left in place; delete them with:")
    print(f"    DELETE FROM tenants WHERE id IN ('{acme}', '{globex}');")
    return 0
