"""Tenant API keys encrypted at rest: the key ring and the ``enc:v1`` envelope.

A tenant's provider key is stored in ``tenants.llm_tokens`` as
``"enc:v1:<key id>:<base64 of nonce and ciphertext>"``: AES-256-GCM (the ``cryptography``
package's AEAD, no hand-written crypto) under one key of the :class:`KeyRing`, with the tenant
id and provider name bound as associated data, so a ciphertext copied into another tenant's
row or another provider's slot does not decrypt.

The key ring is ``LLM_GATEWAY_KEYRING`` (``id1:<base64 of 32 bytes>,id2:...``) or the router's
``keyring=`` argument: the first key encrypts, every key decrypts. Nothing here ever puts a
key (ring key or API key) into a message, a log line or a repr.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets as _random
import uuid
from collections.abc import Iterable, Mapping
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigError

__all__ = [
    "ENCRYPTED_PREFIX",
    "KEYRING_ENV",
    "DecryptError",
    "KeyRing",
    "KeyRingError",
    "generate_entry",
    "is_encrypted",
    "key_id_of",
]

KEYRING_ENV = "LLM_GATEWAY_KEYRING"
ENCRYPTED_PREFIX = "enc:"
_VERSION = "v1"
_HEADER = f"{ENCRYPTED_PREFIX}{_VERSION}:"
_NONCE_BYTES = 12  # GCM's standard nonce; random per value (2^-32 collision bound is far off)
_KEY_BYTES = 32  # AES-256
_KEY_ID = re.compile(r"[A-Za-z0-9_.\-]{1,32}")
log = logging.getLogger("llm_gateway")


class KeyRingError(ConfigError):
    """The key ring itself is malformed, or an operation needs a key ring that is not set."""


class DecryptError(Exception):
    """A stored value that does not decrypt. ``key_id`` is the envelope's key id (if any);
    the message says why, never the value."""

    def __init__(self, key_id: str | None, reason: str) -> None:
        self.key_id = key_id
        self.reason = reason
        shown = f"key id {key_id!r}" if key_id is not None else "no key id"
        super().__init__(f"cannot decrypt ({shown}: {reason})")


def is_encrypted(value: str) -> bool:
    """Whether a stored ``llm_tokens`` value is an envelope (any version) rather than a key."""
    return value.startswith(ENCRYPTED_PREFIX)


def key_id_of(value: str) -> str | None:
    """The key id of a ``enc:v1`` envelope, ``None`` for anything else."""
    if not value.startswith(_HEADER):
        return None
    key_id = value[len(_HEADER) :].partition(":")[0]
    return key_id if _KEY_ID.fullmatch(key_id) else None


def _b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional."""
    text = text.strip().replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _aad(key_id: str, tenant_id: uuid.UUID, provider: str) -> bytes:
    # The envelope's version and key id are bound too: relabelling a value cannot pass.
    return f"llm-gateway:llm_tokens:{_VERSION}:{key_id}:{tenant_id}:{provider}".encode()


def generate_entry(key_id: str | None = None) -> str:
    """A new key ring entry, ``<id>:<base64 of 32 random bytes>``."""
    key_id = key_id or f"k{_random.token_hex(4)}"
    if not _KEY_ID.fullmatch(key_id):
        raise KeyRingError(f"key id {key_id!r} must be 1-32 of A-Z a-z 0-9 _ . -")
    return f"{key_id}:{base64.b64encode(_random.token_bytes(_KEY_BYTES)).decode()}"


class KeyRing:
    """Named AES-256 keys; the first one (the active key) encrypts, every key decrypts.

    Build it from ``KeyRing.parse("id1:<base64>,id2:<base64>")``, from a mapping of id to 32
    key bytes (active id first), or :meth:`from_env`. An empty ring reads only plaintext.
    ``repr`` shows key ids only; a ring cannot be pickled.
    """

    __slots__ = ("_ciphers", "_plaintext_warned", "active_id")

    def __init__(self, keys: Mapping[str, bytes] | Iterable[tuple[str, bytes]] = ()) -> None:
        items = list(keys.items() if isinstance(keys, Mapping) else keys)
        self._ciphers: dict[str, AESGCM] = {}
        for key_id, key in items:
            if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
                raise KeyRingError(f"key id {key_id!r} must be 1-32 of A-Z a-z 0-9 _ . -")
            if key_id in self._ciphers:
                raise KeyRingError(f"key id {key_id!r} appears twice in the key ring")
            if not isinstance(key, bytes | bytearray) or len(key) != _KEY_BYTES:
                size = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
                raise KeyRingError(f"key {key_id!r} must be {_KEY_BYTES} bytes, not {size}")
            self._ciphers[key_id] = AESGCM(bytes(key))
        self.active_id: str | None = items[0][0] if items else None
        # Tenants already warned about plaintext keys: one warning per tenant per ring.
        self._plaintext_warned: set[uuid.UUID] = set()

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """``id1:<base64 of 32 bytes>,id2:...`` (standard or URL-safe base64)."""
        entries: list[tuple[str, bytes]] = []
        for position, entry in enumerate(text.split(","), 1):
            if not entry.strip():
                continue
            key_id, sep, encoded = entry.strip().partition(":")
            if not sep:
                raise KeyRingError(f"key ring entry {position} is not <id>:<base64 key>")
            try:
                key = _b64decode(encoded)
            except (binascii.Error, ValueError):
                raise KeyRingError(f"key {key_id.strip()!r}: not base64") from None
            entries.append((key_id.strip(), key))
        return cls(entries)

    @classmethod
    def from_env(cls) -> KeyRing:
        """The ring in ``$LLM_GATEWAY_KEYRING`` (empty when unset)."""
        return cls.parse(os.environ.get(KEYRING_ENV, ""))

    @classmethod
    def coerce(cls, value: KeyRing | str | Mapping[str, bytes] | None) -> KeyRing:
        """A ring from the router's ``keyring=`` argument; ``None`` reads the environment."""
        if value is None:
            return cls.from_env()
        if isinstance(value, KeyRing):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        return cls(value)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._ciphers)

    def __bool__(self) -> bool:
        return bool(self._ciphers)

    def __repr__(self) -> str:
        return f"KeyRing(key_ids={self.key_ids!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("KeyRing cannot be pickled")

    def require_active(self) -> str:
        """The active key id; :class:`KeyRingError` (saying what to set) for an empty ring."""
        if self.active_id is None:
            raise KeyRingError(
                f"no key ring configured: set {KEYRING_ENV} (`llm-gateway keys generate`)"
            )
        return self.active_id

    def encrypt(self, tenant_id: uuid.UUID, provider: str, key: str) -> str:
        """``key`` as an ``enc:v1`` envelope under the active key, bound to tenant and provider."""
        active = self.require_active()
        nonce = _random.token_bytes(_NONCE_BYTES)
        sealed = self._ciphers[active].encrypt(
            nonce, key.encode(), _aad(active, tenant_id, provider)
        )
        return f"{_HEADER}{active}:{base64.b64encode(nonce + sealed).decode()}"

    def decrypt(self, tenant_id: uuid.UUID, provider: str, value: str) -> str:
        """The key inside an envelope; :class:`DecryptError` says why it does not decrypt."""
        if not value.startswith(_HEADER):
            raise DecryptError(None, "unsupported envelope version")
        key_id, sep, body = value[len(_HEADER) :].partition(":")
        if not sep or not _KEY_ID.fullmatch(key_id):
            raise DecryptError(None, "malformed envelope")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            known = ", ".join(self._ciphers) or f"none: {KEYRING_ENV} is not set"
            raise DecryptError(key_id, f"unknown key id (key ring has {known})")
        try:
            raw = _b64decode(body)
        except (binascii.Error, ValueError):
            raise DecryptError(key_id, "malformed envelope") from None
        if len(raw) <= _NONCE_BYTES + 16:  # nonce + GCM tag, and at least one byte
            raise DecryptError(key_id, "malformed envelope")
        try:
            plain = cipher.decrypt(
                raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _aad(key_id, tenant_id, provider)
            )
        except InvalidTag:
            raise DecryptError(
                key_id, "authentication failed (tampered, or another tenant's or provider's)"
            ) from None
        try:
            return plain.decode()
        except UnicodeDecodeError:
            raise DecryptError(key_id, "not UTF-8 text") from None

    def warn_plaintext(self, tenant_id: uuid.UUID, providers: Iterable[str]) -> None:
        """Log once per tenant that it still has plaintext keys (provider names only)."""
        if tenant_id in self._plaintext_warned:
            return
        self._plaintext_warned.add(tenant_id)
        log.warning(
            "tenant %s has plaintext API keys in llm_tokens (%s): run `llm-gateway tenants"
            " encrypt` to encrypt them at rest",
            tenant_id,
            ", ".join(sorted(providers)),
        )
