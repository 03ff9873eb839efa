"""``tenant_scope``: one transaction whose reads row-level security limits to one tenant.

Migration 007 shows members of ``llm_gateway_tenant_reader`` only the rows of the tenant named
by the ``llm_gateway.tenant_id`` setting; this sets it for the length of one transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

__all__ = ["TENANT_SETTING", "tenant_scope"]

TENANT_SETTING = "llm_gateway.tenant_id"

# is_local = true: the value ends with the transaction, so a pooled connection never carries
# one tenant's scope into the next borrower's queries (it reads '' then: no rows).
_SET = "SELECT set_config('llm_gateway.tenant_id', $1, true)"


@asynccontextmanager
async def tenant_scope(
    conn: asyncpg.Connection | PoolConnectionProxy[asyncpg.Record],
    tenant_id: uuid.UUID | str,
) -> AsyncIterator[None]:
    """Run the block in a new transaction on ``conn`` scoped to ``tenant_id``.

    The transaction commits when the block ends and rolls back when it raises. ``tenant_id``
    must be a UUID (``ValueError`` otherwise, before anything is sent). A connection already in
    a transaction is refused (``RuntimeError``): the setting would outlive the block there.
    """
    try:
        tenant = uuid.UUID(str(tenant_id))
    except ValueError:
        raise ValueError("tenant_scope: tenant_id must be a UUID") from None
    if conn.is_in_transaction():
        raise RuntimeError(
            "tenant_scope needs its own transaction: the connection is already in one"
        )
    async with conn.transaction():
        await conn.execute(_SET, str(tenant))
        yield
