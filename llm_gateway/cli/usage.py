"""``llm-gateway usage report|anomalies|recommend``: answers from the usage ledger.

Tables in a terminal are drawn by ``rich``; ``--format json`` and ``--format csv`` print the
same rows for scripts. Every query is served from the rollups or indexes of migrations 008,
009 and 012 (see ``usage.analytics``); while the daily rollups are being back-filled, answers
read from them say so on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._defaults import DEFAULT_DSN
from ._common import EPILOG

if TYPE_CHECKING:
    import asyncpg

__all__ = ["register"]

_FORMATS = ("table", "json", "csv")


def _tenant(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a tenant uuid: {text!r}") from None


def _since(text: str) -> datetime:
    from usage.analytics.report import parse_since

    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help=f"PostgreSQL DSN (default: DATABASE_URL, else {DEFAULT_DSN})")
    parser.add_argument(
        "--format", choices=_FORMATS, default="table", help="output format (default: table)"
    )


def register(sub: Any) -> None:
    usage = sub.add_parser(
        "usage", help="usage reports, anomalies, model recommendations",
        description="Answers from the usage ledger (model_usage_stats and its rollups).",
    )  # fmt: skip
    usage_sub = usage.add_subparsers(dest="usage_command", required=True, metavar="COMMAND")

    report = usage_sub.add_parser(
        "report", help="requests, tokens, cost and errors per group",
        description="Requests, tokens, cost and errors since a time, grouped.", epilog=EPILOG,
    )  # fmt: skip
    report.add_argument("--tenant", type=_tenant, help="one tenant (default: all)")
    report.add_argument("--user", help="one user of the tenant (needs --tenant)")
    report.add_argument(
        "--since", type=_since, default="30d", help="30d, 12h, 2w or YYYY-MM-DD (default: 30d)"
    )
    report.add_argument(
        "--by", choices=("day", "provider", "model", "user", "endpoint", "tag"), default="day",
        help="grouping (default: day)",
    )  # fmt: skip
    report.add_argument(
        "--html", metavar="FILE",
        help="also write one self-contained HTML page (charts of cost per day by provider and "
        "model, then the tables) to FILE",
    )  # fmt: skip
    _common(report)
    report.set_defaults(run=_report)

    anomalies = usage_sub.add_parser(
        "anomalies", help="hourly cost, request and error-rate anomalies per tenant",
        description="Complete hours whose cost, requests or error rate are far from the "
        "tenant's baseline for that hour of the week.", epilog=EPILOG,
    )  # fmt: skip
    anomalies.add_argument("--tenant", type=_tenant, help="one tenant (default: all)")
    anomalies.add_argument(
        "--since", type=_since, default="24h", help="30d, 12h, 2w or YYYY-MM-DD (default: 24h)"
    )
    anomalies.add_argument(
        "--min-score", type=_positive, default=4.0, help="report from this score (default: 4)"
    )
    _common(anomalies)
    anomalies.set_defaults(run=_anomalies)

    recommend = usage_sub.add_parser(
        "recommend", help="cheaper models a tenant could switch to",
        description="Per endpoint: the models in use, and cheaper ones the tenant's keys reach "
        "(provider settings from the environment) with the monthly saving.", epilog=EPILOG,
    )  # fmt: skip
    recommend.add_argument("--tenant", type=_tenant, required=True, help="the tenant")
    recommend.add_argument(
        "--days", type=int, default=30, help="window of the ledger to read (default: 30)"
    )
    _common(recommend)
    recommend.set_defaults(run=_recommend)


# --- output ----------------------------------------------------------------------------------


def _plain(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, float):
        return round(value, 6)
    return value


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(_plain(value))


def emit(fmt: str, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print ``rows`` as a rich table, JSON (a list of objects) or CSV with a header."""
    if fmt == "json":
        print(json.dumps([{c: _plain(v) for c, v in zip(columns, r, strict=True)} for r in rows]))
        return
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[_plain(v) for v in r] for r in rows])
        return
    from rich.console import Console
    from rich.table import Table

    cells = [[_cell(v) for v in r] for r in rows]
    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        numeric = any(isinstance(r[i], int | float | Decimal) for r in rows)
        table.add_column(c, justify="right" if numeric else "left", no_wrap=True)
    for r in cells:
        table.add_row(*r)
    # Never cut a value: as wide as the widest row needs, even when piped (rich's default
    # then is 80 columns).
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    console = Console()
    console.width = max(console.width, sum(widths) + 3 * len(widths) + 1)
    console.print(table)


# --- commands --------------------------------------------------------------------------------


def _with_pool(args: argparse.Namespace, work: Callable[[asyncpg.Pool], Awaitable[int]]) -> int:
    from ..dsn import create_pool_checked, dsn_source

    dsn, check = dsn_source(args.dsn)

    async def main() -> int:
        pool = await create_pool_checked(dsn, check=check, min_size=1, max_size=2)
        try:
            return await work(pool)
        finally:
            await pool.close()

    return asyncio.run(main())


async def _backfill_note(pool: asyncpg.Pool, since: datetime) -> None:
    """On stderr: the answer reads daily rollups still being back-filled for its window."""
    from usage.analytics.backfill import backfill_state

    state = await backfill_state(pool)
    note = None if state is None else state.note(since)
    if note is not None:
        print(f"llm-gateway: note: {note}", file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    from usage.analytics.backfill import reads_daily_rollups
    from usage.analytics.report import usage_report

    if args.user is not None and args.tenant is None:
        print("llm-gateway usage report: --user needs --tenant", file=sys.stderr)
        return 2
    if args.by == "user" and args.tenant is None:
        print("llm-gateway usage report: --by user needs --tenant", file=sys.stderr)
        return 2

    async def work(pool: asyncpg.Pool) -> int:
        rows = await usage_report(
            pool, since=args.since, by=args.by, tenant_id=args.tenant, user_id=args.user
        )
        scope = f"tenant {args.tenant}" if args.tenant else "all tenants"
        if args.user:
            scope += f", user {args.user}"
        emit(
            args.format,
            f"Usage by {args.by} since {args.since:%Y-%m-%d %H:%M} UTC ({scope})",
            (args.by, "requests", "input_tokens", "output_tokens", "cost_usd", "errors"),
            [(r.key, r.requests, r.input_tokens, r.output_tokens, r.cost_usd, r.errors)
             for r in rows],
        )  # fmt: skip
        if reads_daily_rollups(args.by, args.user is not None):
            await _backfill_note(pool, args.since)
        if args.html is not None:
            return await _write_html(pool, args)
        return 0

    return _with_pool(args, work)


async def _write_html(pool: asyncpg.Pool, args: argparse.Namespace) -> int:
    from usage.analytics.html import build_html_report, render_html

    report = await build_html_report(
        pool, since=args.since, by=args.by, tenant_id=args.tenant, user_id=args.user
    )
    try:
        await asyncio.to_thread(Path(args.html).write_text, render_html(report), "utf-8")
    except OSError as exc:
        print(
            f"llm-gateway usage report: cannot write {args.html}: {exc.strerror}", file=sys.stderr
        )
        return 1
    # On stderr when stdout carries JSON or CSV for a script.
    print(
        f"HTML report written to {args.html}",
        file=sys.stdout if args.format == "table" else sys.stderr,
    )
    return 0


def _anomalies(args: argparse.Namespace) -> int:
    from usage.analytics.anomalies import detect_anomalies

    async def work(pool: asyncpg.Pool) -> int:
        found = await detect_anomalies(
            pool, since=args.since, tenant_id=args.tenant, min_score=args.min_score
        )
        emit(
            args.format,
            f"Anomalies since {args.since:%Y-%m-%d %H:%M} UTC (score >= {args.min_score:g})",
            ("tenant_id", "hour", "metric", "observed", "expected", "score"),
            [(a.tenant_id, a.hour, a.metric, a.observed, a.expected, a.score) for a in found],
        )
        return 0

    return _with_pool(args, work)


def _recommend(args: argparse.Namespace) -> int:
    from usage.analytics.candidates import tenant_candidates
    from usage.analytics.recommend import recommend_models
    from usage.pricing import default_price_book

    if args.days < 1:
        print("llm-gateway usage recommend: --days must be >= 1", file=sys.stderr)
        return 2

    async def work(pool: asyncpg.Pool) -> int:
        prices = default_price_book()
        await prices.refresh(pool)
        candidates = await tenant_candidates(pool, args.tenant)
        in_use, recs = await recommend_models(pool, prices, args.tenant, candidates, days=args.days)
        await _backfill_note(pool, datetime.now(UTC) - timedelta(days=args.days))
        use_cols = ("endpoint", "provider", "model", "requests", "cost_per_1k_requests",
                    "success_rate", "p50_ms", "p95_ms")  # fmt: skip
        use_rows = [
            (u.endpoint, u.provider, u.model_name, u.requests, u.cost_per_1k_requests,
             u.success_rate, u.p50_latency_ms, u.p95_latency_ms)
            for u in in_use
        ]  # fmt: skip
        rec_cols = ("endpoint", "current", "switch_to", "monthly_saving_usd", "success_rate",
                    "success_basis", "context_window")  # fmt: skip
        rec_rows = [(r.current.endpoint, f"{r.current.provider}/{r.current.model_name}",
                     f"{r.provider}/{r.model}", r.monthly_saving_usd, r.success_rate,
                     r.success_basis, r.context_window) for r in recs]  # fmt: skip
        if args.format == "json":  # both tables, as one object
            print(json.dumps({
                "in_use": [{c: _plain(v) for c, v in zip(use_cols, r, strict=True)}
                           for r in use_rows],
                "recommendations": [{c: _plain(v) for c, v in zip(rec_cols, r, strict=True)}
                                    for r in rec_rows],
            }))  # fmt: skip
            return 0
        if args.format == "table":
            emit("table", f"Models in use, last {args.days} days", use_cols, use_rows)
        # CSV: the recommendations only (one table per file).
        emit(args.format, "Cheaper models (saving over 30 days)", rec_cols, rec_rows)
        return 0

    return _with_pool(args, work)
