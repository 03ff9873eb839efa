"""The ``llm-gateway`` command: ``db migrate``, ``simulate`` and ``demo``.

Exit codes: 0 ok, 1 runtime error (one ``llm-gateway: ...`` line on stderr), 2 usage error.
Commands import what they need when they run, so ``--help`` and ``--version`` do not load
the provider SDKs.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._defaults import DEFAULT_DSN
from .errors import GatewayError
from .simulator.behaviour import BEHAVIOURS

__all__ = ["main"]

_DESCRIPTION = "Tenant-aware LLM router: database migrations, a simulated provider, a demo."
_EPILOG = "Exit codes: 0 ok, 1 runtime error, 2 usage error."
_DEFAULT_PORT = 8089


class _VersionAction(argparse.Action):
    """``--version``: the installed distribution's version, read only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("llm-gateway")
        except PackageNotFoundError:  # a source tree on sys.path, never installed
            found = "unknown (not installed)"
        print(f"llm-gateway {found}")  # stdout, like argparse's own "version" action
        parser.exit()


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not within 0..65535")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is not within 0..1")
    return value


def _add_simulate(sub: Any) -> None:
    sim = sub.add_parser(
        "simulate",
        help="run a simulated OpenAI-compatible provider",
        description="Serve a simulated OpenAI-compatible chat provider over HTTP until "
        "SIGINT/SIGTERM. Prints its base URL (http://HOST:PORT/v1) once listening. "
        "Also: python -m llm_gateway.simulator.",
        epilog=_EPILOG,
    )
    sim.add_argument(
        "--port",
        type=_port,
        default=_DEFAULT_PORT,
        help="TCP port; 0 picks a free one (default: %(default)s)",
    )
    sim.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    sim.add_argument("--name", default="sim", help="prefix of every answer (default: %(default)s)")
    sim.add_argument(
        "--model", help="model reported in answers (default: the requested one, else sim-model)"
    )
    sim.add_argument(
        "--latency-ms",
        type=_number,
        default=0.0,
        metavar="MS",
        help="delay before every answer, in milliseconds (default: %(default)s)",
    )
    sim.add_argument(
        "--fail-with",
        choices=sorted(BEHAVIOURS),
        metavar="BEHAVIOUR",
        help="how failing requests fail: every request when --fail-rate is 0, else that "
        "share of them. One of: %(choices)s",
    )
    sim.add_argument(
        "--fail-rate",
        type=_fraction,
        default=0.0,
        metavar="P",
        help="share (0..1) of requests that fail, as --fail-with says or else with 500 "
        "(default: %(default)s)",
    )
    sim.add_argument(
        "--retry-after",
        type=_number,
        default=1.0,
        metavar="SECONDS",
        help="Retry-After header of 429 answers (default: %(default)s)",
    )
    sim.add_argument("--seed", type=int, help="seed of the failure draws, for repeatable runs")
    sim.add_argument(
        "--flavor",
        choices=["openai", "groq"],
        default="openai",
        help="where streamed usage is reported: openai, or groq's x_groq (default: %(default)s)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gateway", description=_DESCRIPTION, epilog=_EPILOG)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = sub.add_parser("db", help="database schema", description="Database schema commands.")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    migrate = db_sub.add_parser(
        "migrate",
        help="apply the SQL migrations",
        description="Apply the SQL migrations not yet applied, each once, in order.",
        epilog=_EPILOG,
    )
    migrate.add_argument(
        "--dsn", help=f"PostgreSQL DSN (default: DATABASE_URL, else {DEFAULT_DSN})"
    )

    _add_simulate(sub)

    demo = sub.add_parser(
        "demo",
        help="route requests for two tenants through simulators",
        description="Route requests for two tenants through three simulated providers "
        "and print the usage report read back from PostgreSQL.",
        epilog=_EPILOG,
    )
    demo.add_argument(
        "--dsn",
        help=f"PostgreSQL DSN (default: DATABASE_URL, else {DEFAULT_DSN}, else an embedded "
        "server when the 'embedded' extra is installed)",
    )
    return parser


def _simulate(args: argparse.Namespace) -> int:
    from .simulator import run_simulator

    try:
        run_simulator(
            args.port,
            host=args.host,
            name=args.name,
            model=args.model,
            latency_ms=args.latency_ms,
            fail_rate=args.fail_rate,
            fail_with=args.fail_with,
            retry_after=args.retry_after,
            seed=args.seed,
            flavor=args.flavor,
        )
    except BrokenPipeError:  # stdout's reader went away: main() handles it
        raise
    except OSError as exc:  # e.g. "cannot listen on 127.0.0.1:8089: Address already in use"
        print(f"llm-gateway: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _flushed(code: int) -> int:
    """``code``, once stdout is flushed: a closed pipe fails here, not at interpreter exit."""
    sys.stdout.flush()
    return code


def _quiet_broken_pipe() -> int:
    """The reader went away (``llm-gateway demo | head -2``): stop quietly, exit 1.

    stdout is pointed at /dev/null so that the interpreter's final flush cannot fail again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "db":
            from .dsn import dsn_source
            from .migrate import apply_migrations

            dsn, check = dsn_source(args.dsn)
            applied = asyncio.run(apply_migrations(dsn, check=check))
            print(f"applied migrations: {applied}" if applied else "schema is up to date")
            return _flushed(0)
        if args.command == "simulate":
            return _flushed(_simulate(args))
        from .demo import run_demo

        return _flushed(asyncio.run(run_demo(args.dsn)))
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except GatewayError as exc:
        print(f"llm-gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
