"""Tenant config validation and provider-name normalisation (no I/O)."""

from __future__ import annotations

import pickle
import uuid

import pytest

from llm_gateway import ApiKey, InvalidTenantConfigError, UnknownProviderError, normalize_provider
from llm_gateway.config import parse_tenant_config

T = uuid.UUID("00000000-0000-0000-0000-0000000000aa")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Groq (Llama 3.3 70B)", "groq"),
        ("OpenRouter (DeepSeek R1)", "openrouter"),
        ("LLM7 GPT-4o Mini", "llm7"),
        ("Local Llama", "local"),
        ("openai", "openai"),
        (" GROQ ", "groq"),
        ("open-router", "openrouter"),
    ],
)
def test_normalize_provider(name: str, expected: str) -> None:
    assert normalize_provider(name) == expected


@pytest.mark.parametrize("name", ["", "anthropic", "my groq", "gro"])
def test_unknown_provider(name: str) -> None:
    with pytest.raises(UnknownProviderError):
        normalize_provider(name)


def test_valid_config_is_normalised_and_ignores_new_keys() -> None:
    config = parse_tenant_config(
        T,
        {"Groq (Llama 3.3 70B)": "gsk_secret", "openrouter": None, "llm7": ""},
        {
            "preferred_provider": "OpenRouter (DeepSeek R1)",
            "auto_failover": False,
            "preferred_models": {"Groq": "llama-3.1-8b-instant"},
            "a_setting_from_a_newer_sdk": {"x": 1},
        },
    )
    assert set(config.keys) == {"groq"}
    assert config.keys["groq"].reveal() == "gsk_secret"
    assert config.inference.preferred_provider == "openrouter"
    assert config.inference.auto_failover is False
    assert config.inference.preferred_models == {"groq": "llama-3.1-8b-instant"}
    assert "gsk_secret" not in repr(config)


def test_jsonb_as_text_is_accepted() -> None:
    config = parse_tenant_config(T, '{"groq": "k"}', '{"preferred_provider": "groq"}')
    assert config.inference.preferred_provider == "groq"


@pytest.mark.parametrize(
    ("tokens", "inference", "field"),
    [
        ({"groq": 42}, {}, "llm_tokens.groq"),
        ({"acme": "k"}, {}, "llm_tokens.acme"),
        ({"groq": "a", "Groq (x)": "b"}, {}, "llm_tokens.Groq (x)"),
        ([], {}, "llm_tokens"),
        ('"{\\"groq\\": \\"k\\"}"', {}, "llm_tokens"),
        ({}, "[1, 2]", "inference_config"),
        ({}, {"auto_failover": "yes"}, "inference_config.auto_failover"),
        ({}, {"preferred_provider": "nobody"}, "inference_config.preferred_provider"),
        ({}, {"preferred_models": {"groq": 7}}, "inference_config.preferred_models.groq"),
        ({}, {"preferred_models": {"nobody": "m"}}, "inference_config.preferred_models"),
        ({}, {"fallback_order": "groq"}, "inference_config.fallback_order"),
        (
            {},
            {"rate_limits": {"groq": {"requests_per_minute": 0}}},
            "inference_config.rate_limits.groq.requests_per_minute",
        ),
    ],
)
def test_invalid_config_names_tenant_and_field(
    tokens: object, inference: object, field: str
) -> None:
    with pytest.raises(InvalidTenantConfigError) as info:
        parse_tenant_config(T, tokens, inference)
    assert info.value.field == field
    assert str(T) in str(info.value)


def test_api_key_never_shows_its_secret() -> None:
    key = ApiKey("sk-very-secret", "tenant")
    assert "sk-very-secret" not in repr(key) and "sk-very-secret" not in str(key)
    assert "sk-very-secret" not in f"{key}"
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(ValueError):
        ApiKey("  ", "system")
