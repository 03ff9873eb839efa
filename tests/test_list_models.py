"""``router.list_models(tenant)`` and ``llm-gateway tenants models TENANT_ID``.

Real PostgreSQL; health is made by real requests to simulated providers over loopback HTTP;
the command runs as a real process against the test database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from llm_gateway import TenantLLMRouter, provider_settings
from llm_gateway.errors import AllProvidersFailedError
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import make_tenant

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "llm-gateway"
MSG = [{"role": "user", "content": "hello"}]
TIMEOUT = 120  # a hang must end the test; the machine is loaded


def rows_by(listing: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m["provider"], m["model"]): m for m in listing["models"]}


async def test_list_models_keys_windows_prices_health_and_exclusions(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    tenant = await make_tenant(
        pg,
        llm_tokens={"groq": "gsk-tenant"},
        inference_config={
            "preferred_models": {"groq": "llama-3.1-8b-instant"},
            "model_groups": {
                "smart": [
                    {"provider": "openrouter", "model": "deepseek/deepseek-r1"},
                    {"provider": "groq", "model": "llama-3.3-70b-versatile"},
                ]
            },
        },
    )
    async with (
        SimulatedProvider(name="groq", flavor="groq") as groq,
        SimulatedProvider(name="llm7") as llm7,
    ):
        providers = {
            "groq": provider_settings("groq", groq.root_url),
            "llm7": provider_settings("llm7", llm7.base_url, api_key="l7-system"),
            "openrouter": provider_settings("openrouter", "http://127.0.0.1:9/v1"),
        }
        async with TenantLLMRouter(pg_dsn, providers=providers, record_usage=False) as router:
            # The system key of llm7 is revoked: its breaker opens (a real 401 over HTTP).
            llm7.script("401")
            with pytest.raises(AllProvidersFailedError) as failed:
                await router.complete_for_tenant(tenant, MSG, model="gpt-4o")
            assert failed.value.attempts[0].error_class == "AuthenticationError"
            listing = await router.list_models(tenant)
            fp_tenant = router.key_fingerprint("gsk-tenant")
    rows = rows_by(listing)
    assert listing["tenant_id"] == str(tenant)

    instant = rows[("groq", "llama-3.1-8b-instant")]
    assert instant["key_source"] == "tenant" and instant["key_fingerprint"] == fp_tenant
    assert instant["context_window"] == 131_072
    assert instant["available"] is True and instant["reason"] is None
    assert instant["health"]["state"] == "unused"
    big = rows[("groq", "llama-3.3-70b-versatile")]
    assert big["price_per_m"] == {"input": 0.59, "output": 0.79}

    gpt4o = rows[("llm7", "gpt-4o")]
    assert gpt4o["key_source"] == "system"
    assert gpt4o["health"]["state"] == "open"
    assert gpt4o["available"] is False and "circuit open" in gpt4o["reason"]

    # openrouter: no tenant key and no system key -> never usable, and said why.
    assert not any(p == "openrouter" for p, _ in rows)
    assert listing["excluded"] == {"openrouter": "no tenant key and no system key"}
    (smart,) = listing["groups"]
    assert (smart["name"], smart["source"]) == ("smart", "tenant")
    assert [(e["provider"], e["model"], e["available"]) for e in smart["entries"]] == [
        ("openrouter", "deepseek/deepseek-r1", False),
        ("groq", "llama-3.3-70b-versatile", True),
    ]
    assert smart["entries"][0]["reason"] == "no tenant key and no system key"


async def test_list_models_without_system_keys(pg_dsn: str, pg: asyncpg.Connection) -> None:
    tenant = await make_tenant(
        pg, llm_tokens={"llm7": "l7-own"}, inference_config={"use_system_keys": False}
    )
    providers = {
        "groq": provider_settings("groq", "http://127.0.0.1:9", api_key="gsk-system"),
        "llm7": provider_settings("llm7", "http://127.0.0.1:9/v1", api_key="l7-system"),
    }
    async with TenantLLMRouter(pg_dsn, providers=providers, record_usage=False) as router:
        listing = await router.list_models(tenant)
    assert {m["provider"] for m in listing["models"]} == {"llm7"}
    assert all(m["key_source"] == "tenant" for m in listing["models"])
    assert listing["excluded"]["groq"] == (
        "no tenant key and system keys are disabled for this tenant"
    )


# --- the command ---------------------------------------------------------------------------


def cli_env(pg_dsn: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.endswith(("_API_KEY", "_BASE_URL")) and k != "LLM_GATEWAY_FINGERPRINT_KEY"
    }
    env.pop("LOCAL_LLM_MODEL", None)
    env.update(
        DATABASE_URL=pg_dsn,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        GROQ_API_KEY="gsk-cli-system",
        GROQ_BASE_URL="http://127.0.0.1:9",
        OPENROUTER_BASE_URL="http://127.0.0.1:9/v1",
        LLM7_BASE_URL="http://127.0.0.1:9/v1",
        OPENAI_BASE_URL="http://127.0.0.1:9/v1",
    )
    return env


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "llm_gateway.cli"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=TIMEOUT
    )


async def test_tenants_models_command_json_and_table(pg_dsn: str, pg: asyncpg.Connection) -> None:
    tenant = await make_tenant(
        pg,
        llm_tokens={"openai": "sk-tenant-cli"},
        inference_config={"model_groups": {"g": [{"provider": "groq", "model": "x-model"}]}},
    )
    env = cli_env(pg_dsn)
    proc = run_cli(env, "tenants", "models", str(tenant), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    rows = rows_by(listing)
    assert rows[("openai", "gpt-4o-mini")]["key_source"] == "tenant"
    assert rows[("groq", "llama-3.3-70b-versatile")]["key_source"] == "system"
    assert listing["excluded"]["openrouter"] == "no tenant key and no system key"
    assert listing["groups"][0]["entries"][0]["model"] == "x-model"
    # The same deployment fingerprint a router on this database shows; never the key.
    async with TenantLLMRouter(pg_dsn, providers={}, record_usage=False) as router:
        assert rows[("openai", "gpt-4o-mini")]["key_fingerprint"] == router.key_fingerprint(
            "sk-tenant-cli"
        )
    assert "sk-tenant-cli" not in proc.stdout and "gsk-cli-system" not in proc.stdout

    table = run_cli(env, "tenants", "models", str(tenant))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["PROVIDER", "MODEL", "KEY", "CONTEXT"]
    assert any(line.split()[:3] == ["openai", "gpt-4o-mini", "tenant"] for line in lines)
    assert any("openrouter" in line and "no tenant key" in line for line in lines)
    assert "sk-tenant-cli" not in table.stdout


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("tenants", "models", "00000000-0000-0000-0000-000000000001"), 1, "unknown tenant"),
        (("tenants", "models", "x", "--format", "yaml"), 2, "invalid choice"),
        (("tenants", "models"), 2, "TENANT_ID"),
    ],
)
def test_tenants_models_command_errors(
    pg_dsn: str, args: tuple[str, ...], code: int, needle: str
) -> None:
    proc = run_cli(cli_env(pg_dsn), *args)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and needle in proc.stderr
    if code == 1:
        assert len(proc.stderr.strip().splitlines()) == 1
        assert proc.stderr.startswith("llm-gateway: ")
