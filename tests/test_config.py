"""Tenant config validation and provider-name normalisation (no I/O)."""

from __future__ import annotations

import pickle
import uuid

import pytest

from llm_gateway import ApiKey, InvalidTenantConfigError, UnknownProviderError, normalize_provider
from llm_gateway.config import parse_rate_limits, parse_tenant_config

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
        {"Groq (Llama 3.3 70B)": "gsk_secret", "openrouter": None},
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
        ({}, {"preferred_models": {"nobody": "m"}}, "inference_config.preferred_models.nobody"),
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


KNOWN = "(known: groq, openrouter, llm7, openai, local)"


@pytest.mark.parametrize(
    ("tokens", "inference", "field", "reason"),
    [
        ({"anthropic": "k"}, {}, "llm_tokens.anthropic", f"unknown provider 'anthropic' {KNOWN}"),
        (
            {},
            {"preferred_provider": "anthropic"},
            "inference_config.preferred_provider",
            f"unknown provider 'anthropic' {KNOWN}",
        ),
        (
            {},
            {"preferred_models": {"anthropic": "claude"}},
            "inference_config.preferred_models.anthropic",
            f"unknown provider 'anthropic' {KNOWN}",
        ),
        (
            {},
            {"fallback_order": "groq"},
            "inference_config.fallback_order",
            "expected an array, got a string",
        ),
        (
            {},
            {"fallback_order": ["groq", None]},
            "inference_config.fallback_order.1",
            "expected a provider name, got null",
        ),
        (
            {},
            {"auto_failover": None},
            "inference_config.auto_failover",
            "expected true or false, got null",
        ),
        (
            {},
            {"preferred_models": {"groq": 7}},
            "inference_config.preferred_models.groq",
            "expected a string, got a number",
        ),
        (
            {},
            {"rate_limits": {"groq": {"requests_per_minute": 0}}},
            "inference_config.rate_limits.groq.requests_per_minute",
            "expected a positive integer, got 0",
        ),
        (
            {},
            {"rate_limits": {"groq": {"request_per_minute": 5}}},
            "inference_config.rate_limits.groq.request_per_minute",
            "unknown setting (known: requests_per_minute, tokens_per_minute, requests_per_day)",
        ),
        ({"groq": 42}, {}, "llm_tokens.groq", "expected a string or null, got a number"),
        ({"groq": ""}, {}, "llm_tokens.groq", "empty key (write null for no key)"),
        ({"groq": "   "}, {}, "llm_tokens.groq", "empty key (write null for no key)"),
        ("[1]", {}, "llm_tokens", "expected a JSON object, got an array"),
        ({}, "3", "inference_config", "expected a JSON object, got a number"),
    ],
)
def test_config_errors_are_readable(
    tokens: object, inference: object, field: str, reason: str
) -> None:
    with pytest.raises(InvalidTenantConfigError) as info:
        parse_tenant_config(T, tokens, inference)
    assert (info.value.field, info.value.reason) == (field, reason)
    assert str(info.value) == f"tenant {T}: invalid {field}: {reason}"


def test_null_key_means_no_key() -> None:
    config = parse_tenant_config(T, {"groq": None, "llm7": "k"}, {})
    assert set(config.keys) == {"llm7"}


def test_a_long_unknown_provider_name_is_not_echoed() -> None:
    pasted_key = "sk-proj-" + "x7" * 96  # 200 characters: a key pasted as a provider name
    for tokens, inference in (
        ({pasted_key: "k"}, {}),
        ({}, {"preferred_provider": pasted_key}),
        ({}, {"preferred_models": {pasted_key: "m"}}),
    ):
        with pytest.raises(InvalidTenantConfigError) as info:
            parse_tenant_config(T, tokens, inference)
        text = f"{info.value} {info.value.field} {info.value.reason}"
        assert "x7x7" not in text, text
        assert "'sk-proj-…' (200 characters)" in info.value.reason


def test_rate_limits_have_one_validation() -> None:
    limits = parse_rate_limits(T, '{"Groq (Llama)": {"requests_per_minute": 10}, "llm7": null}')
    assert set(limits) == {"groq"} and limits["groq"].requests_per_minute == 10
    assert parse_rate_limits(T, None) == {}
    with pytest.raises(InvalidTenantConfigError) as info:
        parse_rate_limits(T, {"groq": {"tokens_per_minute": True}})
    assert str(info.value) == (
        f"tenant {T}: invalid inference_config.rate_limits.groq.tokens_per_minute:"
        " expected an integer, got a boolean"
    )
