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
from typing import Annotated, Any

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from .errors import InvalidTenantConfigError, UnknownProviderError
from .governance.config import Budget, Governance, Rates, SpendLimits
from .keys import ApiKey

__all__ = [
    "PROVIDER_NAMES",
    "InferenceConfig",
    "RateLimits",
    "TenantConfig",
    "normalize_provider",
    "parse_rate_limits",
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
        raise UnknownProviderError(repr(name), PROVIDER_NAMES)
    lowered = name.strip().lower()
    if lowered in PROVIDER_NAMES:
        return lowered
    compact = _NON_ALNUM.sub("", lowered)
    for provider in PROVIDER_NAMES:
        if compact.startswith(provider):
            return provider
    raise UnknownProviderError(name, PROVIDER_NAMES)


def _json_type(value: object) -> str:
    """What a JSON value is, in words (never the value: it may be a key)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _provider_name(value: object) -> str:
    if not isinstance(value, str):
        kind = _json_type(value)
        raise PydanticCustomError(
            "provider", "expected a provider name, got {kind}", {"kind": kind}
        )
    try:
        return normalize_provider(value)
    except UnknownProviderError as exc:
        raise PydanticCustomError("provider", "{reason}", {"reason": str(exc)}) from None


def _model_name(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("model", "empty model name")
    return value


ProviderName = Annotated[str, BeforeValidator(_provider_name)]
ModelName = Annotated[str, AfterValidator(_model_name)]


class RateLimits(Rates):
    """A tenant's quota at one provider (``rate_limits.<provider>``); ``None``: not set.

    The router enforces them (a provider whose quota is used up leaves the chain) and
    ``check_rate_limit_status`` reports them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


def _drop_unset(value: object) -> object:
    # ``{"groq": null}`` (or "") in a per-provider map means "not set for groq".
    if isinstance(value, Mapping):
        return {k: v for k, v in value.items() if v is not None and v != ""}
    return value


class InferenceConfig(BaseModel):
    """The validated ``inference_config`` JSONB document.

    Keys this version does not know are ignored, so a config written for a newer SDK does not
    break an older one. Provider names are normalised.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    preferred_provider: str | None = None
    auto_failover: StrictBool = True
    preferred_models: Annotated[dict[ProviderName, ModelName], BeforeValidator(_drop_unset)] = (
        Field(default_factory=dict)
    )
    # Providers to try after the preferred one, in this order, before the score decides.
    fallback_order: tuple[ProviderName, ...] = ()
    # False: the tenant is served only with its own keys, never with the system's.
    use_system_keys: StrictBool = True
    rate_limits: Annotated[dict[ProviderName, RateLimits], BeforeValidator(_drop_unset)] = Field(
        default_factory=dict
    )
    # Governance (see llm_gateway.governance): each section replaces the router's default one.
    budget: Budget | None = None
    limits: Rates | None = None
    user_limits: SpendLimits | None = None
    system_keys: SpendLimits | None = None

    def governance(self) -> Governance:
        """The tenant's governance sections (``None`` where unset)."""
        return Governance(
            budget=self.budget,
            limits=self.limits,
            user_limits=self.user_limits,
            system_keys=self.system_keys,
        )

    @field_validator("preferred_provider", mode="before")
    @classmethod
    def _preferred(cls, value: object) -> object:
        return None if value in (None, "") else _provider_name(value)


# What a pydantic error type expected, for "expected X, got <JSON type>".
_EXPECTED = {
    "bool_type": "true or false",
    "int_type": "an integer",
    "string_type": "a string",
    "dict_type": "an object",
    "model_type": "an object",
    "tuple_type": "an array",
    "list_type": "an array",
}


def _reason(error: ErrorDetails) -> str:
    kind = error["type"]
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {_json_type(error.get('input'))}"
    if kind == "greater_than" and error.get("ctx", {}).get("gt") == 0:
        return f"expected a positive integer, got {error.get('input')}"
    if kind == "extra_forbidden":  # only RateLimits forbids unknown keys
        return f"unknown setting (known: {', '.join(RateLimits.model_fields)})"
    return error["msg"]


def _validate_inference(tenant_id: uuid.UUID, raw: Mapping[str, Any]) -> InferenceConfig:
    try:
        return InferenceConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        # "[key]" marks an error in a mapping's key; the key itself is already in the path.
        parts = [_clip(str(p)) for p in first["loc"] if p != "[key]"]
        path = ".".join(("inference_config", *parts))
        raise InvalidTenantConfigError(tenant_id, path, _reason(first)) from None


def parse_rate_limits(tenant_id: uuid.UUID, raw: object) -> Mapping[str, RateLimits]:
    """A tenant's ``inference_config.rate_limits`` (JSON text or value), validated exactly as
    :func:`parse_tenant_config` validates it: for readers that need only the limits.

    Keys are normalised provider ids; SQL/JSON ``null`` means no limits configured.
    """
    if isinstance(raw, str | bytes):
        try:
            raw = orjson.loads(raw)
        except ValueError as exc:
            raise InvalidTenantConfigError(
                tenant_id, "inference_config.rate_limits", f"not valid JSON ({exc})"
            ) from None
    if raw is None:
        return {}
    return _validate_inference(tenant_id, {"rate_limits": raw}).rate_limits


def _clip(name: str) -> str:
    # Same rule as UnknownProviderError: a long name may be a pasted key.
    return name if len(name) <= 32 else f"{name[:8]}…"


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
        raise InvalidTenantConfigError(
            tenant_id, column, f"expected a JSON object, got {_json_type(raw)}"
        )
    return raw


def _parse_tokens(tenant_id: uuid.UUID, raw: Mapping[str, Any]) -> dict[str, ApiKey]:
    keys: dict[str, ApiKey] = {}
    for name, value in raw.items():
        field = f"llm_tokens.{_clip(name)}"
        try:
            provider = normalize_provider(name)
        except UnknownProviderError as exc:
            raise InvalidTenantConfigError(tenant_id, field, str(exc)) from None
        if value is None:
            continue  # JSON null: explicitly no key for this provider
        if not isinstance(value, str):
            raise InvalidTenantConfigError(
                tenant_id, field, f"expected a string or null, got {_json_type(value)}"
            )
        if not value.strip():
            # Not "no key": serving the tenant with the system key would be a surprise.
            raise InvalidTenantConfigError(tenant_id, field, "empty key (write null for no key)")
        if provider in keys:
            raise InvalidTenantConfigError(
                tenant_id, field, f"second key for provider {provider!r}"
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
    inference = _validate_inference(
        tenant_id, _as_object(tenant_id, "inference_config", inference_config)
    )
    return TenantConfig(tenant_id, tokens, inference, True, updated_at, name)
