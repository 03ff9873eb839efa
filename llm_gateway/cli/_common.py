"""What every command shares: argument types, exit-code conventions, stdout handling."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

__all__ = [
    "EPILOG",
    "flushed",
    "fraction",
    "get_or_add_group",
    "nonnegative",
    "port",
    "quiet_broken_pipe",
]

EPILOG = "Exit codes: 0 ok, 1 runtime error, 2 usage error."


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
