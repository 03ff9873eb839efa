"""llm-gateway: an async, tenant-aware LLM router with failover and lossless usage accounting.

async with TenantLLMRouter(dsn) as router:
    result = await router.complete_for_tenant(tenant_id, messages)
"""

from __future__ import annotations

# First, before anything imports ``usage``: a user's own usage.py beside their script must fail
# with the cause and the fix, not with "cannot import name ... from 'usage'".
from . import _layout  # noqa: F401  (runs the check on import)
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
from .health import HealthRegistry
from .keys import ApiKey
from .migrate import apply_migrations
from .providers import ProviderSettings, provider_settings, settings_from_env
from .router import DEFAULT_DSN, TenantLLMRouter
from .streaming import CompletionStream, StreamChunk
from .types import Attempt, CompletionResult, TaskType

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DSN",
    "AllProvidersFailedError",
    "ApiKey",
    "Attempt",
    "AuthenticationError",
    "BadRequestError",
    "CompletionResult",
    "CompletionStream",
    "ConfigError",
    "ConfigUnavailableError",
    "DatabaseError",
    "DeadlineExceededError",
    "GatewayError",
    "HealthRegistry",
    "InferenceConfig",
    "InvalidRequestError",
    "InvalidTenantConfigError",
    "MalformedResponseError",
    "MidStreamError",
    "NoProviderAvailableError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderSettings",
    "ProviderTimeoutError",
    "RateLimitError",
    "RouterClosedError",
    "ServerError",
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
