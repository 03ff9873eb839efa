"""``llm-gateway demo``: two tenants, three simulated providers, a failover, a usage report,
and the analytics a newcomer should see (the month's breakdown, a model-switch recommendation).

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
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from .dsn import (
    DatabaseConnectError,
    connect_checked,
    create_pool_checked,
    dsn_source,
    mask_dsn,
    with_database,
)
from .embedded import start_embedded
from .errors import ConfigError, DatabaseError
from .migrate import apply_migrations
from .providers import ProviderSettings, provider_settings
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
# Globex's requests: a document to summarise (about 600 tokens), sent to gpt-4o, so that the
# analytics find a real saving in a cheaper model Globex can use.
DOCUMENT = " ".join(
    f"Day {day}: the checkout service answered {900 + day * 37} requests a minute at peak;"
    f" p95 latency was {180 + day * 11} ms and {day % 3} deploys went out without incident."
    for day in range(1, 21)
)
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


async def _analytics(
    dsn: str,
    check: str,
    started: datetime,
    providers: dict[str, ProviderSettings],
    tenants: dict[str, uuid.UUID],
) -> None:
    """The demo's ending: each tenant's month by provider and model, and the best switch."""
    from usage.analytics.candidates import tenant_candidates
    from usage.analytics.monthly import get_monthly_usage
    from usage.analytics.recommend import Recommendation, recommend_models
    from usage.pricing import default_price_book

    pool = await create_pool_checked(dsn, check=check, min_size=1, max_size=2)
    try:
        # Maintenance refreshes the rollups every few minutes; the demo cannot wait for it.
        await pool.execute(
            "SELECT llm_gateway_refresh_usage_hourly($1, $2)",
            started - timedelta(hours=1),
            datetime.now(UTC) + timedelta(hours=1),
        )
        prices = default_price_book()
        await prices.refresh(pool)
        best: list[tuple[str, Recommendation]] = []
        for label, tenant in tenants.items():
            month = await get_monthly_usage(pool, tenant, started.date())
            print(
                f"\nMonthly usage of {label}, {month.month:%Y-%m} (usage.analytics: per provider"
                " and model; errors are attempts that did not succeed):"
            )
            rows = [
                {"provider/model": f"{m.provider}/{m.model_name}", "requests": m.requests,
                 "tokens_in": m.input_tokens, "tokens_out": m.output_tokens,
                 "cost_usd": m.cost_usd, "errors": m.errors}
                for m in month.by_model
            ]  # fmt: skip
            rows.append(
                {"provider/model": "total", "requests": month.requests,
                 "tokens_in": month.input_tokens, "tokens_out": month.output_tokens,
                 "cost_usd": month.cost_usd, "errors": month.errors}
            )  # fmt: skip
            print(_table(rows, list(rows[0])))
            candidates = await tenant_candidates(pool, tenant, providers)
            _, recs = await recommend_models(pool, prices, tenant, candidates)
            best.extend((label, r) for r in recs)
    finally:
        await pool.close()
    print("\nModel-switch recommendation (usage.analytics, from the last 30 days of the ledger):")
    if not best:
        print("    none: no cheaper priced model that the tenants can use fits their traffic")
        return
    # The largest exact saving (the list's order is by the saving rounded to cents).
    label, rec = max(best, key=lambda f: f[1].current.cost_usd - f[1].projected_cost_usd)
    cur = rec.current
    basis = {"tenant": f"{label}'s own", "all_tenants": "all tenants'", "none": "no data yet"}
    rate = "" if rec.success_rate is None else f" {rec.success_rate:.0%},"
    print(
        f"    {label} {cur.endpoint or '(no endpoint)'}: switch {cur.provider}/{cur.model_name}"
        f" -> {rec.provider}/{rec.model}\n"
        f"    its tokens (in={cur.input_tokens} out={cur.output_tokens}) cost"
        f" ${cur.cost_usd:.6f} on {cur.model_name}, would cost ${rec.projected_cost_usd:.6f}"
        f" on {rec.model}: ${rec.monthly_saving_usd} saved a month at this traffic\n"
        f"    success rate of {rec.model}:{rate} {basis[rec.success_basis]}; context window"
        f" {rec.context_window:,} tokens holds its largest request ({cur.max_tokens} tokens)"
    )


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
    llm7 = SimulatedProvider(name="llm7-sim")  # answers as the model asked for
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
                '{"preferred_provider": "llm7", "auto_failover": true,'
                ' "preferred_models": {"llm7": "gpt-4o"}}',
            )
        finally:
            await conn.close()
        print("\nTenants:")
        print(f"    Acme    {acme}  own keys for openrouter and groq, prefers openrouter")
        print(f"    Globex  {globex}  no keys of its own, prefers llm7 (gpt-4o)")

        print("\nRequests (tokens in/out, cost in USD, latency of the whole request in ms):")
        started = datetime.now(UTC)
        async with TenantLLMRouter(demo_dsn, providers=providers) as router:
            for tenant, label in ((acme, "Acme"), (globex, "Globex")):
                for i in range(3):
                    text = f"Hello from {label}, request {i + 1}"
                    if tenant == globex:
                        text = f"Summarise this report for Globex (request {i + 1}): {DOCUMENT}"
                    result = await router.complete_for_tenant(
                        tenant,
                        [{"role": "user", "content": text}],
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
                    answer = result.content or ""
                    if len(answer) > 72:
                        answer = answer[:72] + "..."
                    print(f"            answer: {answer!r}")
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
    await _analytics(demo_dsn, db.check, started, providers, {"Acme": acme, "Globex": globex})
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
