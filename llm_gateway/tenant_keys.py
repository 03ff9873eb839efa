"""Writing tenants' encrypted API keys: one tenant's keys, or every tenant's in batches.

:func:`set_tenant_keys` merges a tenant's new keys in one ``UPDATE`` (atomic against other
writers). :func:`reencrypt_tenants` backs ``llm-gateway tenants encrypt`` and ``rotate``: it
reads tenants in id order, a batch at a time, and writes each changed row with a
compare-and-set on the value it read, so an edit made meanwhile is never overwritten (that
tenant is read again and retried). Rows already in the wanted form are not written, so a
second run changes nothing and an interrupted run can simply be run again.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from .config import normalize_provider
from .errors import InvalidTenantConfigError, TenantNotFoundError, UnknownProviderError
from .secrets import DecryptError, KeyRing, is_encrypted, key_id_of

__all__ = ["KeyFailure", "ReencryptReport", "reencrypt_tenants", "set_tenant_keys"]

Executor = asyncpg.Pool | asyncpg.Connection

# Drops every JSON key that names one of the providers ($2: 'groq%' patterns, matched like
# normalize_provider: lower case, non-alphanumerics removed, prefix), then merges $3.
_SET_KEYS = """
UPDATE tenants SET llm_tokens = (
    COALESCE(llm_tokens, '{}'::jsonb) - ARRAY(
        SELECT k FROM jsonb_object_keys(COALESCE(llm_tokens, '{}'::jsonb)) AS k
        WHERE regexp_replace(lower(k), '[^a-z0-9]+', '', 'g') LIKE ANY ($2::text[])
    )::text[]
) || $3::jsonb
WHERE id = $1 AND (llm_tokens IS NULL OR jsonb_typeof(llm_tokens) = 'object')
RETURNING id
"""
_READ_BATCH = (
    "SELECT id, llm_tokens::text AS tokens FROM tenants WHERE id > $1 ORDER BY id LIMIT $2"
)
_READ_IDS = "SELECT id, llm_tokens::text AS tokens FROM tenants WHERE id = ANY($1::uuid[])"
# Compare-and-set: a row whose llm_tokens changed since it was read is not written.
_WRITE_BATCH = """
UPDATE tenants AS t SET llm_tokens = u.new::jsonb
FROM unnest($1::uuid[], $2::text[], $3::text[]) AS u(id, old, new)
WHERE t.id = u.id AND t.llm_tokens = u.old::jsonb
RETURNING t.id
"""


def _field(name: str) -> str:
    return f"llm_tokens.{name if len(name) <= 32 else name[:8] + '…'}"


async def set_tenant_keys(
    db: Executor,
    keyring: KeyRing,
    tenant_id: uuid.UUID,
    keys: Mapping[str, str | None],
) -> None:
    """Encrypt ``keys`` and merge them into the tenant's ``llm_tokens`` in one ``UPDATE``.

    A ``None`` value removes that provider's key. Provider names are normalised, and any
    spelling of the same provider already in the row (``"Groq (Llama)"``) is replaced.
    """
    keyring.require_active()  # before anything is validated or written
    sealed: dict[str, str] = {}
    patterns: list[str] = []
    for name, value in keys.items():
        try:
            provider = normalize_provider(name)
        except UnknownProviderError as exc:
            raise InvalidTenantConfigError(tenant_id, _field(str(name)), str(exc)) from None
        if provider + "%" in patterns:
            raise InvalidTenantConfigError(
                tenant_id, _field(name), f"second key for provider {provider!r}"
            )
        patterns.append(provider + "%")
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise InvalidTenantConfigError(
                tenant_id, _field(name), "expected a non-empty key string or None"
            )
        sealed[provider] = keyring.encrypt(tenant_id, provider, value.strip())
    if not patterns:
        return
    updated = await db.fetchval(_SET_KEYS, tenant_id, patterns, orjson.dumps(sealed).decode())
    if updated is None:
        exists = await db.fetchval("SELECT true FROM tenants WHERE id = $1", tenant_id)
        if not exists:
            raise TenantNotFoundError(tenant_id)
        raise InvalidTenantConfigError(tenant_id, "llm_tokens", "expected a JSON object")


@dataclass(frozen=True, slots=True)
class KeyFailure:
    """A value that was left as it was: which tenant, which ``llm_tokens`` field, why."""

    tenant_id: uuid.UUID
    field: str
    reason: str

    def __str__(self) -> str:
        return f"tenant {self.tenant_id}: {self.field}: {self.reason}"


@dataclass(slots=True)
class ReencryptReport:
    """What one run of :func:`reencrypt_tenants` did."""

    tenants_read: int = 0
    tenants_written: int = 0
    keys_encrypted: int = 0  # plaintext keys now encrypted
    keys_rotated: int = 0  # encrypted keys moved to the active key
    retries: int = 0  # rows written by someone else meanwhile, read again
    failures: list[KeyFailure] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenants_read": self.tenants_read,
            "tenants_written": self.tenants_written,
            "keys_encrypted": self.keys_encrypted,
            "keys_rotated": self.keys_rotated,
            "retries": self.retries,
            "failures": [
                {"tenant_id": str(f.tenant_id), "field": f.field, "reason": f.reason}
                for f in self.failures
            ],
        }


@dataclass(slots=True)
class _Outcome:
    new: str | None  # the row's new llm_tokens (JSON), None: leave the row alone
    encrypted: int = 0
    rotated: int = 0
    failures: list[KeyFailure] = field(default_factory=list)


def _reencrypt_row(tenant_id: uuid.UUID, text: str | None, ring: KeyRing, rotate: bool) -> _Outcome:
    """One row's new ``llm_tokens``: plaintext encrypted, and with ``rotate`` every value not
    under the active key re-encrypted. Values that do not decrypt are kept and reported."""
    out = _Outcome(None)
    try:
        tokens = orjson.loads(text) if text is not None else {}
    except ValueError:
        tokens = None
    if not isinstance(tokens, dict):
        out.failures.append(KeyFailure(tenant_id, "llm_tokens", "not a JSON object"))
        return out
    changed = dict(tokens)
    for name, value in tokens.items():
        if not isinstance(value, str) or not value.strip():
            continue  # null (no key) stays; anything else is the config loader's to refuse
        try:
            provider = normalize_provider(name)
        except UnknownProviderError as exc:
            out.failures.append(KeyFailure(tenant_id, _field(name), str(exc)))
            continue
        if not is_encrypted(value):
            changed[name] = ring.encrypt(tenant_id, provider, value.strip())
            out.encrypted += 1
            continue
        try:
            plain = ring.decrypt(tenant_id, provider, value)
        except DecryptError as exc:
            out.failures.append(KeyFailure(tenant_id, _field(name), str(exc)))
            continue
        if rotate and key_id_of(value) != ring.active_id:
            changed[name] = ring.encrypt(tenant_id, provider, plain)
            out.rotated += 1
    if out.encrypted or out.rotated:
        out.new = orjson.dumps(changed).decode()
    return out


async def reencrypt_tenants(
    db: Executor,
    keyring: KeyRing,
    *,
    rotate: bool = False,
    batch_size: int = 500,
    max_retries: int = 5,
) -> ReencryptReport:
    """Encrypt every tenant's plaintext keys (and with ``rotate``, re-encrypt every key that
    is not under the active key), ``batch_size`` tenants at a time.

    Safe while routers serve traffic: each row is written only if it still holds what was
    read; a row changed meanwhile is read again and retried (up to ``max_retries`` times,
    then reported). Values that do not decrypt are kept and listed in ``failures``.
    """
    keyring.require_active()
    report = ReencryptReport()
    last = uuid.UUID(int=0)
    while True:
        rows = await db.fetch(_READ_BATCH, last, batch_size)
        if not rows:
            return report
        last = rows[-1]["id"]
        report.tenants_read += len(rows)
        for attempt in range(max_retries + 1):
            outcomes = {
                r["id"]: _reencrypt_row(r["id"], r["tokens"], keyring, rotate) for r in rows
            }
            old = {r["id"]: r["tokens"] for r in rows}
            ids = [tid for tid, out in outcomes.items() if out.new is not None]
            written: set[uuid.UUID] = set()
            if ids:
                news = [outcomes[tid].new for tid in ids]
                found = await db.fetch(_WRITE_BATCH, ids, [old[tid] for tid in ids], news)
                written = {r["id"] for r in found}
            conflicts = [tid for tid in ids if tid not in written]
            for tid, out in outcomes.items():
                if tid in written:
                    report.tenants_written += 1
                    report.keys_encrypted += out.encrypted
                    report.keys_rotated += out.rotated
                if tid in written or out.new is None:
                    report.failures += out.failures
            if not conflicts:
                break
            if attempt == max_retries:
                report.failures += [
                    KeyFailure(tid, "llm_tokens", "changed by others on every try; run again")
                    for tid in conflicts
                ]
                break
            report.retries += len(conflicts)
            rows = await db.fetch(_READ_IDS, conflicts)  # a deleted tenant is simply gone
