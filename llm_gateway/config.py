"""Tenant configuration: provider names, and validation of the two JSONB documents.

``parse_tenant_config`` is the only place a tenant's ``llm_tokens`` and ``inference_config``
are interpreted; everything after it works on validated, immutable values.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from .errors import InvalidTenantConfigError, UnknownProviderError
from .keys import ApiKey

__all__ = [
    "PROVIDER_NAMES",
    "InferenceConfig",
    "RateLimits",
    "TenantConfig",
    "normalize_provider",
    "parse_tenant_config",
]

# Order matters only for prefix matching: no name is a prefix of another.
PROVIDER_NAMES: tuple[str, ...] = ("groq", "openrouter", "llm7", "openai", "local")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def normalize_provider(name: str) -> str:
    """Map a display name to its provider id: ``'Groq (Llama 3.3 70B)'`` -> ``'groq'``.

    Raises :class:`UnknownProviderError` for a name that matches no provider.
    """
    if not isinstance(name, str):
        raise UnknownProviderError(repr(name))
    lowered = name.strip().lower()
    if lowered in PROVIDER_NAMES:
        return lowered
    compact = _NON_ALNUM.sub("", lowered)
    for provider in PROVIDER_NAMES:
        if compact.startswith(provider):
            return provider
    raise UnknownProviderError(name)


def _provider_key(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"provider name must be a string, got {type(value).__name__}")
    try:
        return normalize_provider(value)
    except UnknownProviderError as exc:
        raise ValueError(str(exc)) from None


class RateLimits(BaseModel):
    """A tenant's limits for one provider; ``None`` means the provider's default applies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int | None = Field(default=None, gt=0, strict=True)
    tokens_per_minute: int | None = Field(default=None, gt=0, strict=True)
    requests_per_day: int | None = Field(default=None, gt=0, strict=True)


class InferenceConfig(BaseModel):
    """The validated ``inference_config`` JSONB document.

    Keys this version does not know are ignored, so a config written for a newer SDK does not
    break an older one. Provider names are normalised.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    preferred_provider: str | None = None
    auto_failover: StrictBool = True
    preferred_models: dict[str, str] = Field(default_factory=dict)
    # Providers to try after the preferred one, in this order, before the score decides.
    fallback_order: tuple[str, ...] = ()
    # False: the tenant is served only with its own keys, never with the system's.
    use_system_keys: StrictBool = True
    rate_limits: dict[str, RateLimits] = Field(default_factory=dict)

    @field_validator("preferred_provider", mode="before")
    @classmethod
    def _preferred(cls, value: object) -> object:
        return None if value in (None, "") else _provider_key(value)

    @field_validator("fallback_order", mode="before")
    @classmethod
    def _order(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return tuple(_provider_key(v) for v in value)
        return value

    @field_validator("preferred_models", "rate_limits", mode="before")
    @classmethod
    def _keys(cls, value: object) -> object:
        if isinstance(value, Mapping):
            return {_provider_key(k): v for k, v in value.items() if v not in (None, "")}
        return value

    @field_validator("preferred_models")
    @classmethod
    def _models(cls, value: dict[str, str]) -> dict[str, str]:
        for provider, model in value.items():
            if not model.strip():
                raise ValueError(f"empty model name for {provider}")
        return value


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A tenant's validated configuration. ``found`` is false for system defaults."""

    tenant_id: uuid.UUID
    keys: Mapping[str, ApiKey]
    inference: InferenceConfig
    found: bool = True
    updated_at: datetime | None = None
    name: str | None = field(default=None, repr=False)


def _as_object(tenant_id: uuid.UUID, column: str, raw: object) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, str | bytes):
        # The column as JSON text: parse it here, so a JSON string value is caught below.
        try:
            raw = orjson.loads(raw)
        except ValueError as exc:
            raise InvalidTenantConfigError(tenant_id, column, f"not valid JSON ({exc})") from None
        if isinstance(raw, str):
            raise InvalidTenantConfigError(
                tenant_id, column, "expected a JSON object, got a JSON string (double-encoded?)"
            )
    if not isinstance(raw, Mapping):
        kind = "array" if isinstance(raw, list) else type(raw).__name__
        raise InvalidTenantConfigError(tenant_id, column, f"expected a JSON object, got {kind}")
    return raw


def _parse_tokens(tenant_id: uuid.UUID, raw: Mapping[str, Any]) -> dict[str, ApiKey]:
    keys: dict[str, ApiKey] = {}
    for name, value in raw.items():
        try:
            provider = normalize_provider(name)
        except UnknownProviderError:
            raise InvalidTenantConfigError(
                tenant_id, f"llm_tokens.{name}", f"unknown provider {name!r}"
            ) from None
        if value is None or value == "":
            continue  # an explicit "no key" entry
        if not isinstance(value, str):
            raise InvalidTenantConfigError(
                tenant_id, f"llm_tokens.{name}", f"expected a string, got {type(value).__name__}"
            )
        if provider in keys:
            raise InvalidTenantConfigError(
                tenant_id, f"llm_tokens.{name}", f"second key for provider {provider!r}"
            )
        keys[provider] = ApiKey(value, "tenant")
    return keys


def parse_tenant_config(
    tenant_id: uuid.UUID,
    llm_tokens: object,
    inference_config: object,
    *,
    updated_at: datetime | None = None,
    name: str | None = None,
) -> TenantConfig:
    """Validate a tenant row's two JSONB values.

    Raises :class:`InvalidTenantConfigError` naming the tenant and the dotted field path.
    The error message never contains a key's value.
    """
    tokens = _parse_tokens(tenant_id, _as_object(tenant_id, "llm_tokens", llm_tokens))
    raw_config = _as_object(tenant_id, "inference_config", inference_config)
    try:
        inference = InferenceConfig.model_validate(raw_config)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        path = ".".join(str(p) for p in ("inference_config", *first["loc"]))
        raise InvalidTenantConfigError(tenant_id, path, first["msg"]) from None
    return TenantConfig(tenant_id, tokens, inference, True, updated_at, name)
