"""Provider settings from environment variables (the README's provider table)."""

from __future__ import annotations

import pytest

from llm_gateway import ApiKey, settings_from_env

DEFAULT_URLS = {
    "groq": "https://api.groq.com",
    "openrouter": "https://openrouter.ai/api/v1",
    "llm7": "https://api.llm7.io/v1",
    "openai": "https://api.openai.com/v1",
}


def test_empty_environment_has_the_four_hosted_providers_without_system_keys() -> None:
    found = settings_from_env({})
    assert sorted(found) == sorted(DEFAULT_URLS)  # no LOCAL_LLM_BASE_URL: no local provider
    assert {name: s.base_url for name, s in found.items()} == DEFAULT_URLS
    assert all(s.api_key is None and s.requires_key for s in found.values())
    assert (found["groq"].family, found["openrouter"].family) == ("groq", "openai")
    assert found["groq"].default_model == "llama-3.3-70b-versatile"


def test_system_keys_are_present_only_where_set() -> None:
    env = {
        "GROQ_API_KEY": "gsk-1",
        "OPENAI_API_KEY": "",
        "LLM7_API_KEY": "l",
        "OPENROUTER_API_KEY": " ",
    }
    found = settings_from_env(env)
    assert found["groq"].api_key == ApiKey("gsk-1", "system")
    assert found["groq"].api_key.source == "system"
    assert found["llm7"].api_key == ApiKey("l", "system")
    assert found["openai"].api_key is None  # an empty variable is no key
    assert found["openrouter"].api_key is None  # nor is a blank one (not a crash)
    assert "gsk-1" not in repr(found["groq"])  # the key never shows in a repr


def test_base_url_overrides_lose_their_trailing_slash() -> None:
    found = settings_from_env(
        {
            "GROQ_BASE_URL": "http://127.0.0.1:9001/",
            "OPENROUTER_BASE_URL": "http://proxy.internal/openrouter/v1//",
            "LLM7_BASE_URL": "",  # empty: the default
        }
    )
    assert found["groq"].base_url == "http://127.0.0.1:9001"
    assert found["openrouter"].base_url == "http://proxy.internal/openrouter/v1"
    assert found["llm7"].base_url == DEFAULT_URLS["llm7"]
    assert found["openai"].base_url == DEFAULT_URLS["openai"]


@pytest.mark.parametrize(
    ("env", "model", "key"),
    [
        ({"LOCAL_LLM_BASE_URL": "http://127.0.0.1:8000/v1/"}, "default", None),
        (
            {
                "LOCAL_LLM_BASE_URL": "http://127.0.0.1:8000/v1",
                "LOCAL_LLM_MODEL": "qwen2.5-7b",
                "LOCAL_LLM_API_KEY": "local-secret",
            },
            "qwen2.5-7b",
            "local-secret",
        ),
    ],
)
def test_local_provider_is_enabled_by_its_base_url(
    env: dict[str, str], model: str, key: str | None
) -> None:
    local = settings_from_env(env)["local"]
    assert local.base_url == "http://127.0.0.1:8000/v1"
    assert local.default_model == model
    assert local.family == "openai"
    assert local.requires_key is False  # a local server usually takes no key
    assert local.api_key == (ApiKey(key, "system") if key else None)


def test_local_model_or_key_without_base_url_does_not_enable_local() -> None:
    found = settings_from_env({"LOCAL_LLM_MODEL": "m", "LOCAL_LLM_API_KEY": "k"})
    assert "local" not in found


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROQ_API_KEY", "from-os-environ")
    monkeypatch.setenv("LOCAL_LLM_BASE_URL", "http://127.0.0.1:8000/v1")
    found = settings_from_env()
    assert found["groq"].api_key == ApiKey("from-os-environ", "system")
    assert "local" in found
