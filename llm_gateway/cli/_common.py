"""What every command shares: argument types, exit-code conventions, stdout handling."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CHECK_EPILOG",
    "EPILOG",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNHEALTHY",
    "EXIT_USAGE",
    "add_format",
    "flushed",
    "fraction",
    "get_or_add_group",
    "nonnegative",
    "port",
    "print_json",
    "print_table",
    "quiet_broken_pipe",
]

# The codes scripts rely on: 1 "could not run" (database unreachable, unknown tenant), 3 "ran,
# and a check failed" (a provider down, migrations pending), so that an alert on 3 does not
# fire for a typo in a DSN. The message on stderr, or the JSON on stdout, says more.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_UNHEALTHY = 3

EPILOG = "Exit codes: 0 ok, 1 runtime error, 2 usage error."
CHECK_EPILOG = "Exit codes: 0 ok, 1 runtime error, 2 usage error, 3 a check failed."


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not within 0..65535")
    return value


def nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def fraction(text: str) -> float:
    value = nonnegative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is not within 0..1")
    return value


def flushed(code: int) -> int:
    """``code``, once stdout is flushed: a closed pipe fails here, not at interpreter exit."""
    sys.stdout.flush()
    return code


def quiet_broken_pipe() -> int:
    """The reader went away (``llm-gateway demo | head -2``): stop quietly, exit 1.

    stdout is pointed at /dev/null so that the interpreter's final flush cannot fail again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 1


_GROUP_ACTION = "_llm_gateway_subcommands"


def get_or_add_group(sub: Any, name: str, help: str) -> Any:
    """The subcommands of command group ``name`` (``tenants``), created by whichever module
    registers first: several modules may add commands to one group without knowing each other.
    ``help`` is used only by the module that creates the group."""
    parser = sub.choices.get(name)
    if parser is None:
        parser = sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".")
        action = parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
        setattr(parser, _GROUP_ACTION, action)
    return getattr(parser, _GROUP_ACTION)


def add_format(parser: argparse.ArgumentParser) -> None:
    """``--format table|json`` (default table)."""
    parser.add_argument(
        "--format", choices=("table", "json"), default="table", help="output format (table)"
    )


def print_json(value: Any) -> None:
    """``value`` as indented JSON; datetimes, UUIDs and decimals as strings."""
    print(json.dumps(value, indent=2, default=str))


def print_table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    right: Sequence[str] = (),
) -> None:
    """A rich table on stdout, never cut (as wide as its widest row, also when piped);
    ``None`` cells are shown as ``-``; columns named in ``right`` are right-aligned."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    cells = [["-" if v is None else str(v) for v in r] for r in rows]
    # Text, not str: a value such as "[groq] 503" is not rich markup.
    table = Table(title=None if title is None else Text(title), title_justify="left")
    for c in columns:
        table.add_column(c, justify="right" if c in right else "left", no_wrap=True)
    for r in cells:
        table.add_row(*map(Text, r))
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    console = Console(highlight=False)
    console.width = max(console.width, sum(widths) + 3 * len(widths) + 1)
    console.print(table)
