"""A process that admits requests through a Governor and writes their usage rows (spawned by
tests/test_governance_processes.py; importable, so multiprocessing's spawn can run it)."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg

from llm_gateway.governance.admission import Governor, QuotaPlan
from llm_gateway.governance.config import Governance
from llm_gateway.governance.errors import QuotaExceededError
from llm_gateway.governance.leases import LeaseClient
from llm_gateway.governance.limits import tenant_specs


class _Entry:
    provider = "groq"
    key_source = "tenant"
    price_per_m = (1.0, 2.0)


async def _run(dsn: str, tenant: str, raw: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    tid = uuid.UUID(tenant)
    whole, system, providers = tenant_specs(tid, Governance.model_validate(raw))
    plan = QuotaPlan(whole, system, providers)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    gov = Governor(LeaseClient(lambda: pool))
    gov.start()
    admitted: list[float] = []
    refused = 0
    entry = _Entry()

    async def one() -> None:
        nonlocal refused
        await asyncio.sleep(rng.random() * 0.5)
        try:
            admission = await gov.admit(plan, (), [entry], 1000, 1000)  # worst case $0.003
        except QuotaExceededError:
            refused += 1
            return
        admitted.append(datetime.now(UTC).timestamp())
        await asyncio.sleep(rng.random() * 0.05)  # the provider call
        cost = Decimal(rng.choice(["0.001", "0.002", "0.003"]))
        usage_id = uuid.uuid4()
        gov.charge(admission, usage_id, float(cost), system_key=False)
        gov.release(admission)
        await pool.execute(
            "INSERT INTO model_usage_stats (id, tenant_id, provider, model_name, latency_ms,"
            " estimated_cost_usd, status, timestamp) VALUES ($1, $2, 'groq', 'm', 1, $3,"
            " 'success', now())",
            usage_id,
            tid,
            cost,
        )
        gov.rows_settled([usage_id])

    await asyncio.gather(*(one() for _ in range(n)))
    statements = gov.client.statements
    await gov.close()
    await pool.close()
    return {"admitted": admitted, "refused": refused, "statements": statements}


def run(dsn: str, tenant: str, raw: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
    return asyncio.run(_run(dsn, tenant, raw, n, seed))
