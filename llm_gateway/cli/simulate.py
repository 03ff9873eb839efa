"""``llm-gateway simulate``: a simulated OpenAI-compatible provider (also
``python -m llm_gateway.simulator``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..simulator.behaviour import BEHAVIOURS
from ._common import EPILOG, fraction, nonnegative, port

__all__ = ["register"]

_DEFAULT_PORT = 8089


def register(sub: Any) -> None:
    sim = sub.add_parser(
        "simulate",
        help="run a simulated OpenAI-compatible provider",
        description="Serve a simulated OpenAI-compatible chat provider over HTTP until "
        "SIGINT/SIGTERM. Prints its base URL (http://HOST:PORT/v1) once listening. "
        "Also: python -m llm_gateway.simulator.",
        epilog=EPILOG,
    )
    sim.add_argument(
        "--port",
        type=port,
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
        type=nonnegative,
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
        type=fraction,
        default=0.0,
        metavar="P",
        help="share (0..1) of requests that fail, as --fail-with says or else with 500 "
        "(default: %(default)s)",
    )
    sim.add_argument(
        "--retry-after",
        type=nonnegative,
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
    sim.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..simulator import run_simulator

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
