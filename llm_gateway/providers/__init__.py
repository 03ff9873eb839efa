"""Provider families: settings, one shared SDK client per provider, error classification."""

from __future__ import annotations

from .base import (
    CONTEXT_WINDOWS,
    Provider,
    ProviderResponse,
    ProviderSettings,
    provider_settings,
    settings_from_env,
)
from .errors import classify, parse_retry_after

__all__ = [
    "CONTEXT_WINDOWS",
    "Provider",
    "ProviderResponse",
    "ProviderSettings",
    "classify",
    "create_provider",
    "parse_retry_after",
    "provider_settings",
    "settings_from_env",
]


def create_provider(settings: ProviderSettings) -> Provider:
    """Build the provider for ``settings`` (one per router; it owns an HTTP connection pool)."""
    if settings.family == "groq":
        from .groq import create_groq_provider

        return create_groq_provider(settings)
    from .openai_compat import create_openai_provider

    return create_openai_provider(settings)
