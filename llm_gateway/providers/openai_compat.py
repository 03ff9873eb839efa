"""OpenRouter, LLM7, OpenAI and local servers, through the official ``openai`` SDK."""

from __future__ import annotations

import httpx2
import openai

from .base import NO_KEY, Provider, ProviderSettings


def create_openai_provider(settings: ProviderSettings) -> Provider:
    """A provider whose SDK client and connection pool live as long as the router."""
    http_client = httpx2.AsyncClient(
        limits=httpx2.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_keepalive,
        ),
        timeout=httpx2.Timeout(60.0, connect=settings.connect_timeout),
    )
    client = openai.AsyncOpenAI(
        api_key=NO_KEY,
        base_url=settings.base_url,
        max_retries=0,
        http_client=http_client,
    )
    return Provider(settings, client)
