"""Groq, through the official ``groq`` SDK."""

from __future__ import annotations

import groq
import httpx

from .base import Provider, ProviderSettings, build_provider


def create_groq_provider(settings: ProviderSettings) -> Provider:
    """A provider on ``groq.AsyncGroq`` (which runs on ``httpx``)."""
    return build_provider(settings, groq.AsyncGroq, httpx, "/openai/v1/chat/completions")
