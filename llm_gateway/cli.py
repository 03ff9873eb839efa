"""The ``llm-gateway`` command: ``db migrate``, ``simulate`` and ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from .errors import GatewayError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    migrate = db_sub.add_parser("migrate", help="apply the SQL migrations")
    migrate.add_argument("--dsn", help="PostgreSQL DSN (default: DATABASE_URL)")

    sim = sub.add_parser("simulate", help="run a simulated OpenAI-compatible provider")
    sim.add_argument("--port", type=int, required=True)
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--name", default="sim", help="prefix of every answer")
    sim.add_argument("--latency-ms", type=float, default=0.0)
    sim.add_argument("--fail-rate", type=float, default=0.0)
    sim.add_argument(
        "--fail-with",
        help="429, 500, 503, drop, malformed, empty, html, hang, 400, 401, ... (see docs)",
    )
    sim.add_argument("--retry-after", type=float, default=1.0)

    demo = sub.add_parser("demo", help="route requests for two tenants through simulators")
    demo.add_argument("--dsn", help="PostgreSQL DSN (default: DATABASE_URL, then local)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "db":
            from .dsn import dsn_source
            from .migrate import apply_migrations

            dsn, check = dsn_source(args.dsn)
            applied = asyncio.run(apply_migrations(dsn, check=check))
            print(f"applied migrations: {applied}" if applied else "schema is up to date")
            return 0
        if args.command == "simulate":
            from .simulator import run_simulator

            run_simulator(
                args.port,
                host=args.host,
                name=args.name,
                latency_ms=args.latency_ms,
                fail_rate=args.fail_rate,
                fail_with=args.fail_with,
                retry_after=args.retry_after,
            )
            return 0
        from .demo import run_demo

        return asyncio.run(run_demo(args.dsn))
    except GatewayError as exc:
        print(f"llm-gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
