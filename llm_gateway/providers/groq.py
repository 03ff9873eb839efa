"""Groq, through the official ``groq`` SDK."""

from __future__ import annotations

import groq
import httpx

from .base import NO_KEY, Provider, ProviderSettings


def create_groq_provider(settings: ProviderSettings) -> Provider:
    """A provider whose SDK client and connection pool live as long as the router."""
    http_client = httpx.AsyncClient(
        limits=httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_keepalive,
        ),
        timeout=httpx.Timeout(60.0, connect=settings.connect_timeout),
    )
    client = groq.AsyncGroq(
        api_key=NO_KEY,
        base_url=settings.base_url,
        max_retries=0,
        http_client=http_client,
    )
    return Provider(settings, client)
