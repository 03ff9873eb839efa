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
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from .errors import ConfigError, InvalidTenantConfigError, UnknownProviderError
from .governance.config import Budget, Governance, Rates, SpendLimits
from .keys import ApiKey
from .secrets import DecryptError, KeyRing, is_encrypted

__all__ = [
    "PROVIDER_NAMES",
    "GroupEntry",
    "HedgeConfig",
    "InferenceConfig",
    "InvalidModelGroupsError",
    "RateLimits",
    "TenantConfig",
    "normalize_provider",
    "parse_model_groups",
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


class GroupEntry(BaseModel):
    """One entry of a model group: a provider and the model to ask it for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: ProviderName
    model: ModelName


def _group_name(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("group", "empty group name")
    return value


def _distinct(entries: tuple[GroupEntry, ...]) -> tuple[GroupEntry, ...]:
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(entries):
        if (entry.provider, entry.model) in seen:
            # Reported at the duplicate's index, like any other error of one entry.
            raise PydanticCustomError(
                "group",
                "{provider}/{model} is listed twice",
                {"index": i, "provider": entry.provider, "model": entry.model},
            )
        seen.add((entry.provider, entry.model))
    return entries


GroupName = Annotated[str, AfterValidator(_group_name)]
# name -> ordered entries; a request with ``model=name`` is routed over them, in this order.
ModelGroups = dict[
    GroupName,
    Annotated[tuple[GroupEntry, ...], Field(min_length=1), AfterValidator(_distinct)],
]
_QUANTILE = re.compile(r"p(\d{2}(?:\.\d+)?)")


class HedgeConfig(BaseModel):
    """When to hedge a non-streamed request: ``{"after_ms": 800}`` or ``{"after": "p95"}``.

    ``after`` names a quantile (``p50`` to ``p99.9``) of the first provider's recent
    latencies (for its model, scaled by ``max_tokens``); with too few samples to know it, the
    request is not hedged. ``false`` (``enabled=False``) turns the router's default off for
    one tenant.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    after_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    after: str | None = None
    enabled: StrictBool = True

    @field_validator("after_ms", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float | None):
            raise PydanticCustomError(
                "hedge",
                "expected a number of milliseconds, got {kind}",
                {"kind": _json_type(value)},
            )
        return value

    @field_validator("after")
    @classmethod
    def _quantile(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _QUANTILE.fullmatch(value)
        if match is None or not 50 <= float(match[1]) < 100:
            raise PydanticCustomError("hedge", "expected a quantile 'p50' to 'p99.9'")
        return value

    @model_validator(mode="after")
    def _one(self) -> HedgeConfig:
        given = (self.after_ms is not None) + (self.after is not None)
        if self.enabled and given != 1:
            raise PydanticCustomError("hedge", "set exactly one of after_ms and after")
        if not self.enabled and given:
            raise PydanticCustomError("hedge", "a disabled hedge takes no after_ms or after")
        return self

    @property
    def quantile(self) -> float:
        """``after`` as a fraction (``"p95"`` -> 0.95); 0.95 when ``after_ms`` is set."""
        return float(self.after[1:]) / 100 if self.after else 0.95


def _hedge(value: object) -> object:
    # ``"hedge": false`` turns a router-wide hedge off for this tenant.
    return {"enabled": False} if value is False else value


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

    # protected_namespaces: pydantic < 2.10 warns about the field "model_groups" otherwise.
    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())

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
    # Named lists of (provider, model): ``complete_for_tenant(..., model="smart")``.
    model_groups: ModelGroups = Field(default_factory=dict)
    # Hedged requests; the tenant's setting wins over the router's ``hedge=``.
    hedge: Annotated[HedgeConfig | None, BeforeValidator(_hedge)] = None
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
    if kind == "extra_forbidden":  # RateLimits, GroupEntry and HedgeConfig forbid unknown keys
        model: type[BaseModel] = RateLimits
        if "model_groups" in error["loc"]:
            model = GroupEntry
        elif error["loc"][:1] == ("hedge",):
            model = HedgeConfig
        return f"unknown setting (known: {', '.join(model.model_fields)})"
    if kind == "too_short":
        return "expected at least one entry"
    return error["msg"]


def _error_path(error: ErrorDetails) -> list[str]:
    # "[key]" marks an error in a mapping's key; the key itself is already in the path.
    parts = [_clip(str(p)) for p in error["loc"] if p != "[key]"]
    if error["type"] == "group" and "index" in error.get("ctx", {}):
        parts.append(str(error["ctx"]["index"]))  # a duplicate entry: point at it
    return parts


class InvalidModelGroupsError(ConfigError, ValueError):
    """The router's ``model_groups=`` fails validation; ``field`` is the dotted path."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid {field}: {reason}")


class _RouterGroups(BaseModel):
    model_config = ConfigDict(frozen=True, protected_namespaces=())

    model_groups: ModelGroups


def parse_model_groups(raw: object) -> Mapping[str, tuple[GroupEntry, ...]]:
    """A router-wide ``model_groups=`` mapping, validated like a tenant's.

    Raises :class:`InvalidModelGroupsError` naming the dotted path
    (``model_groups.smart.0.provider``).
    """
    try:
        return _RouterGroups.model_validate({"model_groups": raw}).model_groups
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise InvalidModelGroupsError(".".join(_error_path(first)), _reason(first)) from None


def _validate_inference(tenant_id: uuid.UUID, raw: Mapping[str, Any]) -> InferenceConfig:
    try:
        return InferenceConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        path = ".".join(("inference_config", *_error_path(first)))
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


def _parse_tokens(
    tenant_id: uuid.UUID, raw: Mapping[str, Any], keyring: KeyRing | None
) -> dict[str, ApiKey]:
    keys: dict[str, ApiKey] = {}
    plaintext: list[str] = []
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
        if is_encrypted(value):
            # Decrypted here, once per config load: requests use the cached ApiKey.
            try:
                value = (keyring or KeyRing()).decrypt(tenant_id, provider, value)
            except DecryptError as exc:
                raise InvalidTenantConfigError(tenant_id, field, str(exc)) from None
        elif value.strip():
            plaintext.append(provider)
        if not value.strip():
            # Not "no key": serving the tenant with the system key would be a surprise.
            raise InvalidTenantConfigError(tenant_id, field, "empty key (write null for no key)")
        if provider in keys:
            raise InvalidTenantConfigError(
                tenant_id, field, f"second key for provider {provider!r}"
            )
        keys[provider] = ApiKey(value, "tenant")
    if plaintext and keyring is not None:
        keyring.warn_plaintext(tenant_id, plaintext)
    return keys


def parse_tenant_config(
    tenant_id: uuid.UUID,
    llm_tokens: object,
    inference_config: object,
    *,
    updated_at: datetime | None = None,
    name: str | None = None,
    keyring: KeyRing | None = None,
) -> TenantConfig:
    """Validate a tenant row's two JSONB values.

    ``enc:v1`` values of ``llm_tokens`` are decrypted with ``keyring`` (see
    :mod:`llm_gateway.secrets`); plaintext values are still read, and the ring logs one
    warning per tenant that has them.
    Raises :class:`InvalidTenantConfigError` naming the tenant and the dotted field path.
    The error message never contains a key's value.
    """
    tokens = _parse_tokens(tenant_id, _as_object(tenant_id, "llm_tokens", llm_tokens), keyring)
    inference = _validate_inference(
        tenant_id, _as_object(tenant_id, "inference_config", inference_config)
    )
    return TenantConfig(tenant_id, tokens, inference, True, updated_at, name)
