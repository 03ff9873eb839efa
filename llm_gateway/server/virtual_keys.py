"""Virtual keys: create, list and revoke them, and authenticate a request's key from memory.

A virtual key (``lgw-`` and 43 URL-safe characters, 256 random bits) is shown once, at
creation. PostgreSQL keeps only its keyed hash: HMAC-SHA256 under a sub-key of the
deployment secret (:meth:`~llm_gateway.keys.Fingerprinter.derive`), so a dump of
``virtual_keys`` does not allow guessing keys offline. :meth:`VirtualKeyStore.authenticate`
hashes the key and looks the hash up in an in-memory cache (no database round trip on a hit);
the lookup is by hash, so its timing tells nothing about the key. Migration 010 sends
``NOTIFY llm_gateway_virtual_keys`` for every update or delete of keys; each store listens
and drops those keys, so a revoked key is refused by every process on its next request (the
cache TTL bounds staleness while the listening connection is down).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import asyncpg
from cachetools import TTLCache

from ..config_listener import ConfigListener
from ..errors import DatabaseError, TenantNotFoundError, VirtualKeyError
from ..governance.keys import KeyQuota
from ..keys import deployment_fingerprinter
from ..tenant_store import as_tenant_id
from .key_spec import check_expiry, check_limits, check_models, check_text

__all__ = ["CHANNEL", "KEY_PREFIX", "VirtualKey", "VirtualKeyError", "VirtualKeyStore"]

CHANNEL = "llm_gateway_virtual_keys"
KEY_PREFIX = "lgw-"
_KEY_RE = re.compile(r"lgw-[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32): 43 characters
_SHOWN = len(KEY_PREFIX) + 6  # characters of a key kept in the clear, for lists
_LABEL = "virtual-keys"
_UNKNOWN_TTL = 5.0  # an unknown key is remembered at most this long (inserts clear it anyway)
_PING = 15.0  # seconds between liveness checks of the idle listening connection
_COLUMNS = (
    "id, tenant_id, user_id, name, prefix, models, limits::text AS limits, expires_at,"
    " revoked_at, created_at"
)
log = logging.getLogger("llm_gateway")


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class VirtualKey:
    """What a virtual key grants. It never holds the key or its hash."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    user_id: str | None
    name: str | None
    prefix: str  # the key's first characters, e.g. "lgw-3f9a1c"
    models: tuple[str, ...] | None  # None: any model the tenant can use
    limits: Mapping[str, Any] | None = field(hash=False)  # governance user_limits shape
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    # Made once per loaded key, not per request: every request of the key passes it on.
    quota: KeyQuota = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "quota", KeyQuota(str(self.id), self.limits or {}))

    def refusal(self, now: datetime) -> str | None:
        """Why the key is refused at ``now`` (``"revoked"``, ``"expired"``), else ``None``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready metadata (for ``keys list --format json``)."""

        def iso(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "id": str(self.id),
            "tenant_id": str(self.tenant_id),
            "user_id": self.user_id,
            "name": self.name,
            "prefix": self.prefix,
            "models": None if self.models is None else list(self.models),
            "limits": None if self.limits is None else dict(self.limits),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "created_at": iso(self.created_at),
        }


def _record(row: asyncpg.Record) -> VirtualKey:
    limits = row["limits"]
    return VirtualKey(
        id=row["id"],
        tenant_id=row["tenant_id"],
        user_id=row["user_id"],
        name=row["name"],
        prefix=row["prefix"],
        models=None if row["models"] is None else tuple(row["models"]),
        limits=None if limits is None else MappingProxyType(json.loads(limits)),
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        created_at=row["created_at"],
    )


_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
_MISSING = object()  # the cached answer for a key that does not exist


class VirtualKeyStore:
    """Virtual keys in PostgreSQL, authenticated from an in-memory cache.

    ``cache_ttl``: seconds a loaded key is trusted without asking PostgreSQL again (it bounds
    staleness only while the listener is down: revocations arrive by NOTIFY). ``notify``:
    listen for changes on a connection taken from ``pool`` for the store's life (close the
    store before the pool). ``clock`` (monotonic, for the TTL) and ``now`` (UTC, for expiry)
    are for tests. ``secret``: the deployment secret, else as :func:`deployment_fingerprinter`.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        cache_ttl: float = 60.0,
        notify: bool = True,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = _utcnow,
        secret: str | bytes | None = None,
        max_cached: int = 100_000,
    ) -> None:
        self._pool = pool
        self._now = now
        self._secret = secret
        self._subkey: bytes | None = None
        self._keys: TTLCache[bytes, Any] = TTLCache(max_cached, cache_ttl, timer=clock)
        self._unknown: TTLCache[bytes, bool] = TTLCache(
            10_000, min(cache_ttl, _UNKNOWN_TTL), timer=clock
        )
        self._by_id: dict[uuid.UUID, bytes] = {}  # key id -> hash, to evict on a notice
        self._inflight: dict[bytes, asyncio.Future[Any]] = {}
        self._generation = 0  # bumped by every notice: a load that overlapped one is not cached
        self._listener = (
            ConfigListener(
                None,
                self._evict,
                self._reset,
                channel=CHANNEL,
                pool=pool,
                signals={"+": self._forget_unknown},
                name="virtual key listener",
                ping_interval=_PING,
            )
            if notify
            else None
        )

    @property
    def listening(self) -> bool:
        """Whether change notices reach this store now (else the cache TTL bounds staleness)."""
        return self._listener is not None and self._listener.state == "listening"

    @property
    def notices(self) -> int:
        return 0 if self._listener is None else self._listener.notices

    def __repr__(self) -> str:
        return f"VirtualKeyStore(cached={len(self._keys)}, listening={self.listening})"

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, *, timeout: float = 10.0) -> None:
        """Load the hashing secret and (``notify``) start listening for changes."""
        await self._ensure_secret()
        if self._listener is not None:
            self._listener.start()
            await self._listener.wait_first_attempt(timeout)

    async def close(self) -> None:
        """Stop listening and give the connection back to the pool (idempotent)."""
        if self._listener is not None:
            await self._listener.close()

    async def __aenter__(self) -> VirtualKeyStore:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _ensure_secret(self) -> bytes:
        if self._subkey is None:
            fingerprinter = await deployment_fingerprinter(self._pool, self._secret)
            self._subkey = fingerprinter.derive(_LABEL)
        return self._subkey

    def _hash(self, subkey: bytes, raw_key: str) -> bytes:
        return hmac.new(subkey, raw_key.encode(), hashlib.sha256).digest()

    # --- keys -----------------------------------------------------------------------------------

    async def create(
        self,
        tenant_id: uuid.UUID | str,
        *,
        user_id: str | None = None,
        name: str | None = None,
        models: Iterable[str] | None = None,
        limits: Mapping[str, Any] | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[str, VirtualKey]:
        """A new key for ``tenant_id``: (the key, shown only now; its record).

        Raises :class:`~llm_gateway.errors.VirtualKeySpecError` for an invalid argument and
        :class:`~llm_gateway.errors.TenantNotFoundError` for a tenant without a row.
        """
        tid = as_tenant_id(tenant_id)
        user_id = check_text("user_id", user_id, 256)
        name = check_text("name", name, 200)
        model_list = check_models(models)
        limit_doc = check_limits(limits)
        expires_at = check_expiry(expires_at, self._now())
        subkey = await self._ensure_secret()
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(
                    "INSERT INTO virtual_keys (tenant_id, user_id, name, prefix, key_hash, models,"
                    " limits, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8)"
                    f" RETURNING {_COLUMNS}",
                    tid,
                    user_id,
                    name,
                    raw[:_SHOWN],
                    self._hash(subkey, raw),
                    model_list,
                    None if limit_doc is None else json.dumps(limit_doc),
                    expires_at,
                )
        except asyncpg.ForeignKeyViolationError:
            raise TenantNotFoundError(tid) from None
        except _DB_ERRORS as exc:
            raise DatabaseError(f"cannot store the virtual key ({type(exc).__name__})") from exc
        assert row is not None
        self._unknown.clear()  # the notice would do it too, a moment later
        return raw, _record(row)

    async def list(self, tenant_id: uuid.UUID | str | None = None) -> list[VirtualKey]:
        """Every key (of ``tenant_id``), oldest first, revoked and expired ones included."""
        where, args = (
            ("", ()) if tenant_id is None else (" WHERE tenant_id = $1", (as_tenant_id(tenant_id),))
        )
        try:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(
                    f"SELECT {_COLUMNS} FROM virtual_keys{where} ORDER BY created_at, id", *args
                )
        except _DB_ERRORS as exc:
            raise DatabaseError(f"cannot list virtual keys ({type(exc).__name__})") from exc
        return [_record(r) for r in rows]

    async def revoke(self, key_id: uuid.UUID | str) -> bool:
        """Revoke a key; ``False`` when there is no such key. Every process refuses it on its
        next request (NOTIFY at commit). Revoking a revoked key keeps its first ``revoked_at``."""
        try:
            kid = key_id if isinstance(key_id, uuid.UUID) else uuid.UUID(str(key_id))
        except ValueError:
            return False
        try:
            async with self._pool.acquire() as conn:
                found = await conn.fetchval(
                    "WITH r AS (UPDATE virtual_keys SET revoked_at = now()"
                    " WHERE id = $1 AND revoked_at IS NULL RETURNING id)"
                    " SELECT EXISTS (SELECT 1 FROM r)"
                    " OR EXISTS (SELECT 1 FROM virtual_keys WHERE id = $1)",
                    kid,
                )
        except _DB_ERRORS as exc:
            raise DatabaseError(f"cannot revoke the virtual key ({type(exc).__name__})") from exc
        self._evict((kid,))  # here at once; other processes on the notice
        return bool(found)

    def allows_model(self, key: VirtualKey, model: str | None) -> bool:
        """Whether ``key`` may use ``model`` (a model id or a model group name, as requested).

        A key limited to some models needs the request to name one of them.
        """
        if key.models is None:
            return True
        return model is not None and model in key.models

    # --- authentication -----------------------------------------------------------------------

    async def authenticate(self, raw_key: str) -> VirtualKey:
        """The key's record, or :class:`~llm_gateway.errors.VirtualKeyError` (``reason``:
        malformed, unknown, revoked, expired). Served from memory when cached."""
        if not isinstance(raw_key, str) or _KEY_RE.fullmatch(raw_key) is None:
            raise VirtualKeyError("malformed")
        subkey = self._subkey if self._subkey is not None else await self._ensure_secret()
        digest = self._hash(subkey, raw_key)
        found = self._keys.get(digest)
        if found is None:
            if digest in self._unknown:
                raise VirtualKeyError("unknown")
            found = await self._load(digest)
        if found is _MISSING:
            raise VirtualKeyError("unknown")
        key: VirtualKey = found
        reason = key.refusal(self._now())
        if reason is not None:
            raise VirtualKeyError(reason, key.id)
        return key

    async def _load(self, digest: bytes) -> Any:
        """One query per missing hash, shared by concurrent callers."""
        future = self._inflight.get(digest)
        if future is None:
            future = asyncio.ensure_future(self._fetch(digest))
            self._inflight[digest] = future
            future.add_done_callback(lambda f: self._loaded(digest, f))
        return await asyncio.shield(future)

    def _loaded(self, digest: bytes, future: asyncio.Future[Any]) -> None:
        self._inflight.pop(digest, None)
        if not future.cancelled():
            future.exception()  # retrieved: callers that were cancelled meanwhile never see it

    async def _fetch(self, digest: bytes) -> Any:
        generation = self._generation
        try:
            async with self._pool.acquire() as conn:
                # last_used_at is written once per load (per cache TTL), never per request;
                # migration 010 sends no notice for it.
                row = await conn.fetchrow(
                    "UPDATE virtual_keys SET last_used_at = now() WHERE key_hash = $1"
                    f" RETURNING {_COLUMNS}",
                    digest,
                )
        except _DB_ERRORS as exc:
            raise DatabaseError(f"cannot look up the virtual key ({type(exc).__name__})") from exc
        if row is None:
            if generation == self._generation:
                self._unknown[digest] = True
            return _MISSING
        key = _record(row)
        if generation == self._generation:  # no notice meanwhile: the row is current
            self._keys[digest] = key
            self._by_id[key.id] = digest
            if len(self._by_id) > 2 * max(len(self._keys), 1000):
                self._by_id = {k.id: d for d, k in self._keys.items()}
        return key

    # --- change notices -------------------------------------------------------------------------

    def _evict(self, ids: Iterable[uuid.UUID]) -> None:
        self._generation += 1
        for kid in ids:
            digest = self._by_id.pop(kid, None)
            if digest is not None:
                self._keys.pop(digest, None)

    def _reset(self) -> None:
        self._generation += 1
        self._keys.clear()
        self._unknown.clear()
        self._by_id.clear()

    def _forget_unknown(self) -> None:
        self._generation += 1
        self._unknown.clear()
