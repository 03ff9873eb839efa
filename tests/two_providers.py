"""Two simulated providers for the attempt-loop tests: "a" speaks Groq's API (the tenant's
preferred ``groq``), "b" the OpenAI API (its fallback ``llm7``). The ``two_sims`` fixture that
starts them is in conftest.py."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg

from llm_gateway import provider_settings
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import make_tenant


def settings(a: SimulatedProvider, b: SimulatedProvider, **options: Any) -> dict[str, Any]:
    return {
        "groq": provider_settings("groq", a.root_url, api_key="sys-a", **options),
        "llm7": provider_settings("llm7", b.base_url, api_key="sys-b", **options),
    }


async def rows(
    pg: asyncpg.Connection, tenant: uuid.UUID, *, by_attempt: bool = False
) -> list[dict[str, Any]]:
    """The tenant's usage rows in time order (or by attempt number), ``metadata`` decoded."""
    order = "attempt" if by_attempt else "timestamp, attempt"
    found = await pg.fetch(
        f"SELECT * FROM model_usage_stats WHERE tenant_id = $1 ORDER BY {order}", tenant
    )
    return [{**r, "metadata": json.loads(r["metadata"] or "null")} for r in found]


async def prefer_groq(pg: asyncpg.Connection, **config: Any) -> uuid.UUID:
    """A tenant served by groq ("a"), failing over to llm7 ("b"); ``config`` adds to it."""
    inference = {"preferred_provider": "groq", "fallback_order": ["llm7"], **config}
    return await make_tenant(pg, inference_config=inference)
