"""A router process that holds budget reservations until it is killed (for the lease tests).

``python -m tests.governance_lease_holder DSN BASE_URL TENANT N SPOOL_DIR``: sends N requests (each
reserving its worst case under the tenant's budget) to a provider that answers slowly, then
waits; the test kills it with SIGKILL while they are in flight.
"""

from __future__ import annotations

import asyncio
import sys

from llm_gateway import TenantLLMRouter, provider_settings

MSG = [{"role": "user", "content": "hello there"}]


async def main(dsn: str, url: str, tenant: str, n: int, spool: str) -> None:
    router = TenantLLMRouter(
        dsn,
        providers={"llm7": provider_settings("llm7", url, api_key="sys-l")},
        spool_dir=spool,  # its tracker also loads model_prices, which budgets need
        timeout=3600,
    )
    await router.start()
    tasks = []
    for _ in range(n):
        # Spaced out: each is admitted on its own, none refused for a renewal in flight.
        tasks.append(asyncio.create_task(router.complete_for_tenant(tenant, MSG, max_tokens=20)))
        await asyncio.sleep(0.05)
    print("sent", flush=True)
    await asyncio.gather(*tasks)  # killed long before these end


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
