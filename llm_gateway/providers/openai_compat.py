"""OpenRouter, LLM7, OpenAI and local servers, through the official ``openai`` SDK."""

from __future__ import annotations

import httpx2
import openai

from .base import Provider, ProviderSettings, build_provider


def create_openai_provider(settings: ProviderSettings) -> Provider:
    """A provider on ``openai.AsyncOpenAI`` (which runs on ``httpx2``)."""
    return build_provider(settings, openai.AsyncOpenAI, httpx2, "/chat/completions")
