"""llm-gateway: an async, tenant-aware LLM router with failover and lossless usage accounting.

async with TenantLLMRouter(dsn) as router:
    result = await router.complete_for_tenant(tenant_id, messages)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# First, before anything imports ``usage``: a user's own usage.py beside their script must fail
# with the cause and the fix, not with "cannot import name ... from 'usage'".
from . import _layout  # noqa: F401  (runs the check on import)

if TYPE_CHECKING:
    from ._defaults import DEFAULT_DSN
    from .config import InferenceConfig, TenantConfig, normalize_provider
    from .default import (
        close_tenant_router,
        complete_for_tenant,
        get_tenant_router,
        stream_for_tenant,
    )
    from .errors import (
        AllProvidersFailedError,
        AuthenticationError,
        BadRequestError,
        ConfigError,
        ConfigUnavailableError,
        DatabaseError,
        DeadlineExceededError,
        EmptyResponseError,
        GatewayError,
        InvalidRequestError,
        InvalidTenantConfigError,
        MalformedResponseError,
        MidStreamError,
        NoProviderAvailableError,
        ProviderConnectionError,
        ProviderError,
        ProviderTimeoutError,
        RateLimitError,
        RouterClosedError,
        ServerError,
        TenantNotFoundError,
        UnknownProviderError,
    )
    from .governance.errors import BudgetExceededError, QuotaExceededError
    from .governance.keys import KeyQuota
    from .health import HealthRegistry
    from .keys import ApiKey
    from .migrate import apply_migrations
    from .providers import ProviderSettings, provider_settings, settings_from_env
    from .router import TenantLLMRouter
    from .simulator import SimulatedProvider
    from .streaming import CompletionStream, StreamChunk
    from .types import Attempt, CompletionResult, TaskType

    __version__: str

# Public names are imported on first use (PEP 562): `import llm_gateway`, and with it
# `llm-gateway --help`, must not pay for the openai/groq SDKs and pydantic (~0.7 s).
_EXPORTS: dict[str, str] = {
    "InferenceConfig": "config",
    "TenantConfig": "config",
    "normalize_provider": "config",
    "close_tenant_router": "default",
    "complete_for_tenant": "default",
    "get_tenant_router": "default",
    "stream_for_tenant": "default",
    "AllProvidersFailedError": "errors",
    "AuthenticationError": "errors",
    "BadRequestError": "errors",
    "ConfigError": "errors",
    "ConfigUnavailableError": "errors",
    "DatabaseError": "errors",
    "DeadlineExceededError": "errors",
    "EmptyResponseError": "errors",
    "GatewayError": "errors",
    "InvalidRequestError": "errors",
    "RouterClosedError": "errors",
    "InvalidTenantConfigError": "errors",
    "MalformedResponseError": "errors",
    "MidStreamError": "errors",
    "NoProviderAvailableError": "errors",
    "ProviderConnectionError": "errors",
    "ProviderError": "errors",
    "ProviderTimeoutError": "errors",
    "RateLimitError": "errors",
    "ServerError": "errors",
    "TenantNotFoundError": "errors",
    "UnknownProviderError": "errors",
    "BudgetExceededError": "governance.errors",
    "QuotaExceededError": "governance.errors",
    "KeyQuota": "governance.keys",
    "HealthRegistry": "health",
    "ApiKey": "keys",
    "apply_migrations": "migrate",
    "ProviderSettings": "providers",
    "provider_settings": "providers",
    "settings_from_env": "providers",
    "DEFAULT_DSN": "_defaults",
    "TenantLLMRouter": "router",
    "CompletionStream": "streaming",
    "StreamChunk": "streaming",
    "Attempt": "types",
    "CompletionResult": "types",
    "TaskType": "types",
    "SimulatedProvider": "simulator",
}
"""Public name -> the submodule that defines it."""

__all__ = [
    "DEFAULT_DSN",
    "AllProvidersFailedError",
    "ApiKey",
    "Attempt",
    "AuthenticationError",
    "BadRequestError",
    "BudgetExceededError",
    "CompletionResult",
    "CompletionStream",
    "ConfigError",
    "ConfigUnavailableError",
    "DatabaseError",
    "DeadlineExceededError",
    "EmptyResponseError",
    "GatewayError",
    "HealthRegistry",
    "InferenceConfig",
    "InvalidRequestError",
    "InvalidTenantConfigError",
    "KeyQuota",
    "MalformedResponseError",
    "MidStreamError",
    "NoProviderAvailableError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderSettings",
    "ProviderTimeoutError",
    "QuotaExceededError",
    "RateLimitError",
    "RouterClosedError",
    "ServerError",
    "SimulatedProvider",
    "StreamChunk",
    "TaskType",
    "TenantConfig",
    "TenantLLMRouter",
    "TenantNotFoundError",
    "UnknownProviderError",
    "apply_migrations",
    "close_tenant_router",
    "complete_for_tenant",
    "get_tenant_router",
    "normalize_provider",
    "provider_settings",
    "settings_from_env",
    "stream_for_tenant",
]


def __getattr__(name: str) -> Any:
    """Import a public name's submodule on first access; ``__version__`` from the metadata."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("llm-gateway")
        except PackageNotFoundError:  # a source tree on sys.path, never installed
            return "0+unknown"
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "__version__"})
