"""The ``llm-gateway`` command tree; each command lives in a module of this package.

Exit codes: 0 ok, 1 runtime error (one ``llm-gateway: ...`` line on stderr) or a failed check
(``health``, ``db status``), 2 usage error.
Commands import what they need when they run, so ``--help`` and ``--version`` do not load
the provider SDKs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import GatewayError
from ._common import EPILOG, flushed, quiet_broken_pipe

__all__ = ["main"]

_DESCRIPTION = "Tenant-aware LLM router: database migrations, a simulated provider, a demo."

# One module per command (group): each has ``register(subparsers)``, which sets ``run``.
# A new command adds its module here; registering imports nothing heavy.
COMMANDS: tuple[str, ...] = (
    "db",
    "simulate",
    "demo",
    "tenants",
    "keys",
    "usage",
    "quota",
    "health",
    "serve",
)


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gateway", description=_DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return flushed(args.run(args))
    except BrokenPipeError:
        return quiet_broken_pipe()
    except GatewayError as exc:
        print(f"llm-gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
