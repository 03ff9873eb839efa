"""``llm-gateway db migrate|status|backfill``: apply the SQL migrations; report the database's
state; back-fill the analytics rollups.

``status`` reads only: applied and pending migrations, the usage partitions, the rollup's
freshness, what the analytics back-fill has left and this machine's usage spool backlog. It
exits 1 when migrations are pending (and, like every command, when the database cannot be
reached). ``backfill`` runs ``llm_gateway_backfill_usage_analytics()`` (migration 012) batch
after batch, each its own transaction, printing progress; stopped, it resumes where it was.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._defaults import DEFAULT_DSN
from ._common import (
    CHECK_EPILOG,
    EPILOG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNHEALTHY,
    EXIT_USAGE,
    add_format,
    print_json,
    print_table,
)

if TYPE_CHECKING:
    import asyncpg

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
    status = db_sub.add_parser(
        "status",
        help="migrations, usage partitions, rollup freshness, analytics back-fill, spool backlog",
        description="Applied migrations and those of this package not yet applied, the"
        " partitions of model_usage_stats (range, row estimate, size), when the usage rollup"
        " was last refreshed and how long ago, what the analytics back-fill has left, and the"
        " rows waiting in this machine's usage spool. Exits 1 when migrations are pending or"
        " the database cannot be reached.",
        epilog=CHECK_EPILOG,
    )
    status.add_argument("--dsn", help=f"PostgreSQL DSN (default: DATABASE_URL, else {DEFAULT_DSN})")
    status.add_argument(
        "--spool-dir",
        type=Path,
        help="the usage spool (default: LLM_GATEWAY_SPOOL_DIR, else ~/.cache/llm-gateway/spool)",
    )
    add_format(status)
    status.set_defaults(run=status_command)
    backfill = db_sub.add_parser(
        "backfill",
        help="fill the analytics rollups and anomaly scores of rows older than the migrations",
        description="Fill the daily analytics rollups (migration 009) for the days written"
        " before them, newest first, then the stored anomaly scores (012) of older hours: one"
        " transaction per batch, with progress. Maintenance does the same a batch per run;"
        " this does it all now. Safe to stop and run again.",
        epilog=EPILOG,
    )
    backfill.add_argument(
        "--dsn", help=f"PostgreSQL DSN (default: DATABASE_URL, else {DEFAULT_DSN})"
    )
    backfill.add_argument(
        "--days", type=int, default=1, help="days per batch (transaction); default 1"
    )
    backfill.set_defaults(run=backfill_command)


def migrate_command(args: argparse.Namespace) -> int:
    from ..dsn import dsn_source
    from ..migrate import apply_migrations

    dsn, check = dsn_source(args.dsn)
    applied = asyncio.run(apply_migrations(dsn, check=check))
    print(f"applied migrations: {applied}" if applied else "schema is up to date")
    return 0


_BACKFILL = "SELECT * FROM llm_gateway_backfill_usage_analytics($1)"


def backfill_command(args: argparse.Namespace) -> int:
    import time

    from ..dsn import connect_checked, dsn_source

    if args.days < 1:
        print("llm-gateway db backfill: --days must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    dsn, check = dsn_source(args.dsn)

    async def run() -> int:
        conn = await connect_checked(dsn, check=check)
        try:
            if not await conn.fetchval(
                "SELECT to_regproc('llm_gateway_backfill_usage_analytics') IS NOT NULL"
            ):
                print(
                    "llm-gateway db backfill: this database has no back-fill (migration 012);"
                    " run: llm-gateway db migrate",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            started = time.perf_counter()
            last: tuple[object, ...] = ()
            while True:
                batch = time.perf_counter()
                row = await conn.fetchrow(_BACKFILL, args.days)  # autocommit: one transaction
                assert row is not None
                if row["part"] == "done":
                    break
                step = (row["part"], row["done_from"], row["days_left"])
                if step == last:  # no progress: never loop forever
                    print(f"llm-gateway db backfill: stuck at {step}", file=sys.stderr)
                    return EXIT_FAILED
                last = step
                print(
                    f"{row['part']}: complete from {row['done_from']:%Y-%m-%d %H:%M} UTC,"
                    f" {row['days_left']} days left ({time.perf_counter() - batch:.1f} s)",
                    flush=True,
                )
            print(f"analytics back-fill complete ({time.perf_counter() - started:.1f} s)")
            return EXIT_OK
        finally:
            await conn.close()

    return asyncio.run(run())


# --- status ----------------------------------------------------------------------------------

_PARTITIONS = """
SELECT p.partition::text AS name, p.range_from, p.range_to, p.is_default,
       CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::bigint END AS row_estimate,
       pg_total_relation_size(p.partition) AS bytes
FROM llm_gateway_usage_partitions() p JOIN pg_class c ON c.oid = p.partition
ORDER BY p.is_default, p.range_from NULLS FIRST
"""
_ROLLUP = """
SELECT max(value) FILTER (WHERE key = 'usage_rollup_refreshed_to') AS refreshed_to,
       max(updated_at) FILTER (WHERE key = 'usage_rollup_refreshed_to'
                               AND value IS NOT NULL) AS last_refresh,
       max(value) FILTER (WHERE key = 'usage_stats_analyzed_at') AS analyzed_at,
       now() AS now
FROM llm_gateway_settings
"""


def _iso(value: datetime | str | None) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def _earlier_checksums(sql: str) -> list[str]:
    """Checksums of earlier texts of a migration edited in place that leave a database as
    current as this text does: its ``-- earlier-checksums: ...`` line."""
    found = re.search(r"^-- earlier-checksums:(.*)$", sql, re.M)
    return found[1].split() if found else []


async def _migrations(conn: asyncpg.Connection) -> dict[str, Any]:
    from ..migrate import load_migrations

    shipped = {m.version: m for m in load_migrations()}
    applied: dict[int, Any] = {}
    if await conn.fetchval("SELECT to_regclass('llm_gateway_migrations') IS NOT NULL"):
        rows = await conn.fetch(
            "SELECT version, name, checksum, applied_at FROM llm_gateway_migrations"
        )
        applied = {r["version"]: r for r in rows}
    listed = []
    for version in sorted(set(shipped) | set(applied)):
        row, mine = applied.get(version), shipped.get(version)
        if row is None:
            state = "pending"
        elif mine is None:
            state = "unknown"  # applied by a newer version of the package
        else:
            current = {mine.checksum, *_earlier_checksums(mine.sql)}
            state = "applied" if row["checksum"] in current else "changed"
        listed.append(
            {
                "version": version,
                "name": row["name"] if row is not None else mine.name if mine else None,
                "state": state,
                "applied_at": None if row is None else _iso(row["applied_at"]),
            }
        )
    return {
        "migrations": listed,
        "pending": [m["version"] for m in listed if m["state"] == "pending"],
    }


async def _usage(conn: asyncpg.Connection) -> dict[str, Any]:
    has = await conn.fetchval(
        "SELECT to_regprocedure('llm_gateway_usage_partitions()') IS NOT NULL"
        " AND to_regclass('llm_gateway_settings') IS NOT NULL"
    )
    if not has:  # before migration 002
        return {"partitions": [], "rollup": None, "analytics": None}
    partitions = [
        {**dict(r), "range_from": _iso(r["range_from"]), "range_to": _iso(r["range_to"])}
        for r in await conn.fetch(_PARTITIONS)
    ]
    r = await conn.fetchrow(_ROLLUP)
    assert r is not None  # an aggregate: always one row
    last = r["last_refresh"]
    rollup = {
        "refreshed_to": r["refreshed_to"],
        "last_refresh": _iso(last),
        "lag_seconds": None if last is None else round((r["now"] - last).total_seconds(), 1),
        "analyzed_at": r["analyzed_at"],
    }
    return {"partitions": partitions, "rollup": rollup, "analytics": await _analytics(conn)}


async def _analytics(conn: asyncpg.Connection) -> dict[str, Any] | None:
    """What the analytics back-fill has left (migration 012); None before it."""
    if not await conn.fetchval(
        "SELECT to_regproc('llm_gateway_usage_analytics_backfill_state') IS NOT NULL"
    ):
        return None
    r = await conn.fetchrow("SELECT * FROM llm_gateway_usage_analytics_backfill_state()")
    assert r is not None
    before = r["rollups_pending_before"]
    return {
        "rollups_pending_before": None if before is None else before.isoformat(),
        "rollup_days_left": r["rollup_days_left"],
        "scores_from": _iso(r["scores_from"]),
        "scores_to": _iso(r["scores_to"]),
        "score_days_left": r["score_days_left"],
    }


def spool_backlog(directory: Path) -> dict[str, Any]:
    """Files and rows waiting in a usage spool. A missing folder is not created; an existing
    one is checked (private to this user) as the usage writer checks it before replaying."""
    from usage.spool import Spool

    found: dict[str, Any] = {
        "directory": str(directory),
        "exists": directory.is_dir(),
        "pending_files": 0,
        "pending_rows": 0,
        "oldest": None,
        "rejected_files": 0,
        "error": None,
    }
    if not found["exists"]:
        return found
    try:
        # Spool checks the folder is private (as a replaying writer would) before reading it.
        files = Spool(directory).files()
        rejected = directory / "rejected"
        found["rejected_files"] = sum(1 for p in rejected.iterdir() if p.is_file())
    except OSError as exc:
        found["error"] = str(exc)
        return found
    found["pending_files"] = len(files)
    found["pending_rows"] = sum(f.rows for f in files)
    if files:  # usage-<time_ns>-...: the name says when it was written
        written = int(files[0].path.name.split("-")[1]) / 1e9
        found["oldest"] = datetime.fromtimestamp(written, UTC).isoformat()
    return found


async def database_status(dsn: str, check: str) -> dict[str, Any]:
    """Migrations, partitions and rollup freshness of the database at ``dsn``."""
    from ..dsn import connect_checked

    conn = await connect_checked(dsn, check=check)
    try:
        return {**await _migrations(conn), **await _usage(conn)}
    finally:
        await conn.close()


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024:
            return f"{value:g} {unit}"
        value = round(value / 1024, 1)
    return f"{value:g} TB"


def _print(report: dict[str, Any]) -> None:
    print_table(
        "migrations",
        ("VERSION", "NAME", "STATE", "APPLIED_AT"),
        [(m["version"], m["name"], m["state"], m["applied_at"]) for m in report["migrations"]],
        right=("VERSION",),
    )
    print_table(
        "usage partitions (model_usage_stats)",
        ("PARTITION", "FROM", "TO", "ROWS (EST.)", "SIZE"),
        [
            (
                p["name"],
                "DEFAULT" if p["is_default"] else p["range_from"] or "MINVALUE",
                "" if p["is_default"] else p["range_to"] or "MAXVALUE",
                p["row_estimate"],
                _size(p["bytes"]),
            )
            for p in report["partitions"]
        ],
        right=("ROWS (EST.)", "SIZE"),
    )
    rollup = report["rollup"] or {}
    spool = report["spool"]
    analytics = report["analytics"]
    backfill = []
    if analytics is not None:
        before = analytics["rollups_pending_before"]
        backfill = [
            (
                "analytics rollups",
                "complete" if before is None else f"back-filling: {analytics['rollup_days_left']}"
                f" days before {before} left (llm-gateway db backfill)",
            ),
            (
                "anomaly scores stored",
                f"{analytics['scores_from'] or '-'} .. {analytics['scores_to'] or '-'}"
                + (f"; {analytics['score_days_left']} days to back-fill"
                   if analytics["score_days_left"] else ""),
            ),
        ]  # fmt: skip
    print_table(
        "rollup and spool",
        ("ITEM", "VALUE"),
        [
            ("rollup refreshed to", rollup.get("refreshed_to") or "never"),
            ("rollup last refresh", rollup.get("last_refresh") or "never"),
            ("rollup lag (s)", rollup.get("lag_seconds")),
            *backfill,
            ("spool directory", spool["directory"] + ("" if spool["exists"] else " (absent)")),
            ("spool pending files", spool["pending_files"]),
            ("spool pending rows", spool["pending_rows"]),
            ("spool oldest file", spool["oldest"]),
            ("spool rejected files", spool["rejected_files"]),
            *([("spool error", spool["error"])] if spool["error"] else []),
        ],
    )
    if report["pending"]:
        print(f"pending migrations: {report['pending']} (run: llm-gateway db migrate)")


def status_command(args: argparse.Namespace) -> int:
    from usage.spool import default_spool_dir

    from ..dsn import dsn_source

    dsn, check = dsn_source(args.dsn)
    report = asyncio.run(database_status(dsn, check))
    report["spool"] = spool_backlog(args.spool_dir or default_spool_dir())
    report["ok"] = not report["pending"]
    if args.format == "json":
        print_json(report)
    else:
        _print(report)
    return EXIT_OK if report["ok"] else EXIT_UNHEALTHY
