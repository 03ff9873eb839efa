"""What model groups cost: building a tenant's routes once per config load, and choosing a
group's chain per request, next to the tenant's usual chain. Pure CPU, no I/O.

    python bench/bench_groups.py [--repeats 5] [--loops 20000]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable

from llm_gateway.chain import _usual_route, build_route, order_chain, route_for
from llm_gateway.config import parse_model_groups, parse_tenant_config
from llm_gateway.health import HealthRegistry
from llm_gateway.keys import Fingerprinter
from llm_gateway.providers import settings_from_env
from usage.pricing import default_price_book

ENV = {
    "GROQ_API_KEY": "g",
    "OPENROUTER_API_KEY": "o",
    "LLM7_API_KEY": "l",
    "OPENAI_API_KEY": "a",
}
GROUPS = {
    name: [
        {"provider": "groq", "model": "llama-3.3-70b-versatile"},
        {"provider": "openrouter", "model": "anthropic/claude-3.5-sonnet"},
        {"provider": "openai", "model": "gpt-4o"},
    ]
    for name in ("smart", "cheap", "long")
}


def per_call_us(fn: Callable[[], object], loops: int, repeats: int) -> tuple[float, float, float]:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        runs.append((time.perf_counter() - t0) / loops * 1e6)
    return statistics.median(runs), min(runs), max(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loops", type=int, default=20_000)
    args = parser.parse_args()
    providers = settings_from_env(ENV)
    price = default_price_book().lookup
    fp = Fingerprinter("bench")
    config = parse_tenant_config(uuid.uuid4(), {"groq": "t"}, {"preferred_provider": "groq"})
    groups = parse_model_groups(GROUPS)
    health = HealthRegistry()
    route = build_route(config, providers, price, fp, groups)

    figures = {
        "the usual route alone (what a load built before groups)": lambda: _usual_route(
            config, providers, price, fp
        ),
        "build_route, no groups (per config load)": lambda: build_route(
            config, providers, price, fp
        ),
        "build_route, 3 router groups (per config load)": lambda: build_route(
            config, providers, price, fp, groups
        ),
        "usual chain: route_for(None) + order_chain (per request)": lambda: order_chain(
            route_for(route, None), health, 100, 0.0
        ),
        'group chain: route_for("smart") + order_chain (per request)': lambda: order_chain(
            route_for(route, "smart"), health, 100, 0.0
        ),
        'model chain: route_for("gpt-4o") + order_chain (per request)': lambda: order_chain(
            route_for(route, "gpt-4o"), health, 100, 0.0
        ),
    }
    print(f"{len(route.models)} concrete-model routes, {len(route.groups)} group routes")
    print(f"median µs per call over {args.repeats} runs of {args.loops} (min-max)")
    for name, fn in figures.items():
        loops = args.loops // 10 if name.startswith("build") else args.loops
        median, low, high = per_call_us(fn, loops, args.repeats)
        print(f"{median:8.2f}  ({low:.2f}-{high:.2f})  {name}")


if __name__ == "__main__":
    main()
