"""The PostgreSQL side of leases: one statement renews every lease a process asks for."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import orjson

__all__ = ["LeaseClient"]

_RENEW = "SELECT llm_gateway_quota_renew($1, $2, $3::jsonb)::text"
_RELEASE = "SELECT llm_gateway_quota_release($1)"


class LeaseClient:
    """Renews and releases the leases of one process (``holder``) on a shared pool.

    ``statements`` counts the statements sent, for the benchmark's per-1,000-requests figure.
    """

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        *,
        holder: uuid.UUID | None = None,
        lease_ttl: float = 10.0,
        timeout: float = 5.0,
    ) -> None:
        self._pool = pool
        self.holder = holder or uuid.uuid4()
        self.lease_ttl = lease_ttl
        self.timeout = timeout
        self.statements = 0

    async def renew(self, requests: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Answers by lease key. Raises asyncpg/OS errors and ``TimeoutError``."""
        self.statements += 1
        raw = await self._pool().fetchval(
            _RENEW,
            self.holder,
            self.lease_ttl,
            orjson.dumps(list(requests)).decode(),
            timeout=self.timeout,
        )
        return {a["key"]: a for a in orjson.loads(raw)}

    async def release(self) -> None:
        """Give back every lease of this process (at shutdown)."""
        self.statements += 1
        await self._pool().fetchval(_RELEASE, self.holder, timeout=self.timeout)
