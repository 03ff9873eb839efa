"""The models a tenant can actually call, for :func:`usage.analytics.recommend.recommend_models`.

Imports ``llm_gateway`` inside the function: ``llm_gateway`` imports ``usage``, so a
module-level import would make ``import usage`` circular.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .recommend import CandidateModel

if TYPE_CHECKING:
    import asyncpg

    from llm_gateway.providers import ProviderSettings

__all__ = ["tenant_candidates"]


async def tenant_candidates(
    pool: asyncpg.Pool[asyncpg.Record],
    tenant_id: uuid.UUID | str,
    providers: Mapping[str, ProviderSettings] | None = None,
) -> list[CandidateModel]:
    """Every model of every provider the tenant has a key for (or may use a system key of).

    ``providers``: the router's provider settings (default: from the environment, as the
    router builds them). A model's context window comes from those settings (``None`` when
    unknown). A tenant without a row gets the system defaults.
    """
    from llm_gateway.config import parse_tenant_config
    from llm_gateway.providers import settings_from_env

    tid = tenant_id if isinstance(tenant_id, uuid.UUID) else uuid.UUID(str(tenant_id))
    row = await pool.fetchrow(
        "SELECT llm_tokens::text AS tokens, inference_config::text AS inference"
        " FROM tenants WHERE id = $1",
        tid,
    )
    tokens = json.loads(row["tokens"]) if row is not None else {}
    inference = json.loads(row["inference"]) if row is not None else {}
    config = parse_tenant_config(tid, tokens, inference)
    settings = settings_from_env() if providers is None else providers
    found: list[CandidateModel] = []
    for name, s in settings.items():
        has_key = name in config.keys or (
            config.inference.use_system_keys and s.api_key is not None
        )
        if not has_key and s.requires_key:
            continue
        models: dict[str, int | None] = dict(s.models)
        models.setdefault(s.default_model, None)
        found.extend(CandidateModel(name, m, w) for m, w in models.items())
    return found
