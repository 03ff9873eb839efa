"""``python -m llm_gateway.simulator [--port N] [--fail-with 429 --fail-rate 0.2] ...``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import BEHAVIOURS, run_simulator


def main(argv: Sequence[str] | None = None) -> None:
    """Parse command-line options and run the simulator until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m llm_gateway.simulator")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="sim")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--fail-with", choices=sorted(BEHAVIOURS), default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--flavor", choices=["openai", "groq"], default="openai")
    args = parser.parse_args(argv)
    run_simulator(
        args.port,
        latency_ms=args.latency_ms,
        fail_rate=args.fail_rate,
        fail_with=args.fail_with,
        host=args.host,
        name=args.name,
        model=args.model,
        seed=args.seed,
        flavor=args.flavor,
    )


if __name__ == "__main__":
    main()
