"""Chain building, ordering and per-key health (pure logic, injected clock)."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from llm_gateway.chain import build_route, explain_route, order_chain
from llm_gateway.config import parse_tenant_config
from llm_gateway.errors import (
    AuthenticationError,
    BadRequestError,
    RateLimitError,
    ServerError,
)
from llm_gateway.health import HealthRegistry
from llm_gateway.keys import Fingerprinter
from llm_gateway.providers import parse_retry_after, provider_settings
from usage.pricing import Price

T = uuid.UUID("00000000-0000-0000-0000-0000000000bb")
PROVIDERS = {
    "groq": provider_settings("groq", "http://127.0.0.1:1", api_key="sys-groq"),
    "openrouter": provider_settings("openrouter", "http://127.0.0.1:2/v1"),
    "llm7": provider_settings("llm7", "http://127.0.0.1:3/v1", api_key="sys-llm7"),
    "local": provider_settings("local", "http://127.0.0.1:4/v1", default_model="qwen"),
}


def price(provider: str, model: str) -> Price | None:
    return {
        "groq": Price(Decimal("0.59"), Decimal("0.79")),
        "llm7": Price(Decimal("5"), Decimal("15")),
    }.get(provider)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


FINGERPRINT = Fingerprinter("test-deployment")


def route(tokens: dict[str, str] | None = None, **inference: object):  # type: ignore[no-untyped-def]
    config = parse_tenant_config(T, tokens or {}, inference)
    return build_route(config, PROVIDERS, price, FINGERPRINT)


def test_tenant_key_first_then_system_key_and_exclusions() -> None:
    r = route({"openrouter": "tenant-or"}, preferred_provider="llm7")
    by_name = {e.provider: e for e in r.entries}
    assert by_name["openrouter"].key_source == "tenant"
    assert by_name["groq"].key_source == "system"
    assert by_name["local"].key_source == "none" and by_name["local"].key is None
    assert r.entries[0].provider == "llm7"
    assert by_name["groq"].model == "llama-3.3-70b-versatile"

    strict = route({"openrouter": "tenant-or"}, use_system_keys=False)
    assert [e.provider for e in strict.entries] == ["openrouter", "local"]
    assert set(strict.excluded) == {"groq", "llm7"}


def test_entries_carry_the_deployment_fingerprint_of_their_key() -> None:
    by_name = {e.provider: e for e in route({"openrouter": "tenant-or"}).entries}
    assert by_name["openrouter"].fingerprint == FINGERPRINT("tenant-or")
    assert by_name["groq"].fingerprint == FINGERPRINT("sys-groq")
    assert by_name["local"].fingerprint == "nokey"


def test_explain_lists_a_preferred_provider_the_router_cannot_use() -> None:
    r = route(preferred_provider="openai", fallback_order=["openai", "groq"])
    explained = explain_route(r, HealthRegistry(), 100, 0.0)
    assert explained["chain"][0]["provider"] == "groq"
    assert explained["excluded"]["openai"] == (
        "preferred provider, but the router has no settings for this provider"
    )
    r = route(fallback_order=["openai"])
    assert explain_route(r, HealthRegistry(), 100, 0.0)["excluded"]["openai"] == (
        "in fallback_order, but the router has no settings for this provider"
    )


def test_preferred_and_fallback_order_are_kept_rest_scored() -> None:
    health = HealthRegistry(clock=Clock())
    r = route(preferred_provider="llm7", fallback_order=["local"])
    chain = order_chain(r, health, 100, 0.0)
    assert [e.provider for e in chain][:2] == ["llm7", "local"]
    assert [e.provider for e in chain][2:] == ["groq"]


def test_tenant_keys_come_before_system_keys() -> None:
    # llm7 is far pricier, but the tenant pays for it with its own key.
    r = route({"llm7": "tenant-llm7"})
    names = [e.provider for e in order_chain(r, HealthRegistry(), 10_000, 0.0)]
    assert names[0] == "llm7"


def test_score_prefers_healthy_fast_key() -> None:
    clock = Clock()
    health = HealthRegistry(clock=clock)
    r = route({"openrouter": "or"})
    for _ in range(3):
        health.on_success(health.get("groq", r.entries[0].fingerprint), 2.0)
    or_state = health.get(
        "openrouter", next(e.fingerprint for e in r.entries if e.provider == "openrouter")
    )
    health.on_success(or_state, 0.05)
    names = [e.provider for e in order_chain(r, health, 100, clock.now)]
    assert names.index("openrouter") < names.index("groq")


def test_context_window_excludes_small_models() -> None:
    r = route(preferred_models={"groq": "mixtral-8x7b-32768"})
    skipped: dict[str, str] = {}
    chain = order_chain(r, HealthRegistry(), 50_000, 0.0, skipped)
    assert "groq" not in [e.provider for e in chain]
    assert "32768" in skipped["groq"]


def test_auto_failover_off_keeps_only_preferred() -> None:
    clock = Clock()
    health = HealthRegistry(clock=clock, failure_threshold=1)
    r = route(preferred_provider="groq", auto_failover=False)
    assert [e.provider for e in order_chain(r, health, 100, clock.now)] == ["groq"]
    groq = r.entries[0]
    health.on_failure(health.get("groq", groq.fingerprint), ServerError("x", provider="groq"))
    assert order_chain(r, health, 100, clock.now) == []


def test_breaker_opens_half_opens_and_closes() -> None:
    clock = Clock()
    health = HealthRegistry(clock=clock, failure_threshold=3, cooldown=10)
    state = health.get("groq", "fp")
    for _ in range(2):
        health.on_failure(state, ServerError("boom", provider="groq", status_code=503))
    assert health.blocked(state, clock.now) is None
    health.on_failure(state, ServerError("boom", provider="groq", status_code=503))
    assert "circuit open" in (health.blocked(state, clock.now) or "")
    clock.now += 10.5
    assert health.blocked(state, clock.now) is None  # half-open: one probe may go
    health.on_attempt(state)
    assert "probe in flight" in (health.blocked(state, clock.now) or "")
    health.on_failure(state, ServerError("boom", provider="groq", status_code=503))
    assert "circuit open" in (health.blocked(state, clock.now) or "")
    clock.now += 10.5
    health.on_attempt(state)
    health.on_success(state, 0.1)
    assert health.blocked(state, clock.now) is None and state.consecutive_failures == 0


def test_bad_key_and_rate_limit_are_per_key() -> None:
    clock = Clock()
    health = HealthRegistry(clock=clock)
    tenant_key, system_key = health.get("groq", "tenant-fp"), health.get("groq", "system-fp")
    health.on_failure(tenant_key, AuthenticationError("bad key", provider="groq", status_code=401))
    assert health.blocked(tenant_key, clock.now) is not None
    assert health.blocked(system_key, clock.now) is None
    health.on_failure(system_key, RateLimitError("slow down", provider="groq", retry_after=5))
    assert "rate limited" in (health.blocked(system_key, clock.now) or "")
    clock.now += 5.1
    assert health.blocked(system_key, clock.now) is None


def test_request_errors_do_not_hurt_health() -> None:
    health = HealthRegistry(failure_threshold=1)
    state = health.get("groq", "fp")
    health.on_failure(state, BadRequestError("bad", provider="groq", status_code=400))
    assert state.failures == 0 and health.blocked(state, 0.0) is None


@pytest.mark.parametrize(
    ("headers", "message", "expected"),
    [
        ({"retry-after": "5"}, "", 5.0),
        ({"retry-after-ms": "1500"}, "", 1.5),
        ({}, "Rate limit reached. Please try again in 5.289s. Visit ...", 5.289),
        ({}, "Please try again in 1m2.5s.", 62.5),
        ({}, "Please try again in 590ms.", 0.59),
        ({}, "no hint", None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], message: str, expected: float | None) -> None:
    got = parse_retry_after(headers, message)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_breaker_opens_on_windowed_error_rate() -> None:
    clock = Clock()
    health = HealthRegistry(clock=clock, failure_threshold=100, min_requests=10)
    state = health.get("groq", "fp")
    # Alternating failures never reach 100 in a row, but the error rate climbs past 50%.
    for i in range(40):
        health.on_attempt(state)
        if i % 4 == 0:
            health.on_success(state, 0.1)
        else:
            health.on_failure(state, ServerError("flaky", provider="groq", status_code=502))
        if health.blocked(state, clock.now):
            break
    assert "circuit open" in (health.blocked(state, clock.now) or "")
    assert state.consecutive_failures < 100
