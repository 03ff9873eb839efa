"""A router process for the multi-process governance tests (importable for spawn)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from llm_gateway import TenantLLMRouter, provider_settings
from llm_gateway.governance.errors import QuotaExceededError

MSG = [{"role": "user", "content": "hello there"}]


async def _run(
    dsn: str, url: str, tenant: str, n: int, seed: int, spool: str, options: dict[str, Any]
) -> dict[str, Any]:
    rng = random.Random(seed)
    options = dict(options)
    # At most this many requests in flight (None: all n at once, within half a second).
    gate = asyncio.Semaphore(options.pop("concurrency", n))
    events: list[dict[str, Any]] = []
    router = TenantLLMRouter(
        dsn,
        providers={"llm7": provider_settings("llm7", url, api_key="sys-l")},
        spool_dir=spool,
        on_budget_event=events.append,
        **options,
    )
    served: list[float] = []
    refused = 0
    async with router:

        async def one() -> None:
            nonlocal refused
            await asyncio.sleep(rng.random() * 0.5)
            async with gate:
                try:
                    await router.complete_for_tenant(tenant, MSG, max_tokens=20)
                except QuotaExceededError:
                    refused += 1
                    return
            served.append(time.time())

        await asyncio.gather(*(one() for _ in range(n)))
        statements = router._gate.governor.client.statements
    return {"served": served, "refused": refused, "events": events, "statements": statements}


def run(
    dsn: str, url: str, tenant: str, n: int, seed: int, spool: str, options: dict[str, Any]
) -> dict[str, Any]:
    return asyncio.run(_run(dsn, url, tenant, n, seed, spool, options))
