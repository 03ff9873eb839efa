"""Prices: the shipped table, cost math and rounding, and model_prices overrides."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from usage import PRICE_TABLE_VERSION, ModelUsageTracker, Price, PriceBook, calculate_cost
from usage.pricing import lookup_price


@pytest.mark.parametrize(
    ("provider", "model", "inp", "out", "expected"),
    [
        ("groq", "llama-3.3-70b-versatile", 1000, 2000, "0.002170"),  # 590 + 1580 per M
        ("groq", "llama-3.1-8b-instant", 1_000_000, 1_000_000, "0.130000"),
        ("groq", "mixtral-8x7b-32768", 500, 500, "0.000240"),
        ("openrouter", "deepseek/deepseek-r1", 1_000_000, 0, "0.550000"),
        ("openrouter", "anthropic/claude-3.5-sonnet", 2000, 1000, "0.021000"),
        ("openrouter", "google/gemini-pro-1.5", 4000, 400, "0.007000"),
        ("llm7", "gpt-4o-mini", 100_000, 10_000, "0.021000"),
        ("llm7", "gpt-4o", 1000, 1000, "0.020000"),
        ("llm7", "gpt-4-turbo", 0, 1000, "0.030000"),
        ("openai", "gpt-4o", 1000, 1000, "0.012500"),
        ("openai", "gpt-4o-mini", 1000, 1000, "0.000750"),
    ],
)
def test_shipped_prices(provider: str, model: str, inp: int, out: int, expected: str) -> None:
    cost = calculate_cost(provider, model, inp, out)
    assert cost == Decimal(expected)
    assert cost is not None and cost.as_tuple().exponent == -6


def test_local_models_are_free_and_priced() -> None:
    assert calculate_cost("local", "llama3.2:3b", 123_456, 654_321) == Decimal("0.000000")
    price = lookup_price("local", "anything-at-all")
    assert price is not None and price.input_per_m == 0 and price.output_per_m == 0


def test_unknown_model_or_missing_counts_give_none_never_zero() -> None:
    assert calculate_cost("groq", "no-such-model", 100, 100) is None
    assert calculate_cost("nobody", "gpt-4o", 100, 100) is None
    assert calculate_cost("groq", "llama-3.3-70b-versatile", None, 100) is None
    assert calculate_cost("groq", "llama-3.3-70b-versatile", 100, None) is None
    assert calculate_cost("groq", "llama-3.3-70b-versatile", -1, 100) is None
    assert lookup_price("groq", "no-such-model") is None


def test_rounding_is_half_up_to_six_places() -> None:
    # 30 tokens at 0.15/M = 0.0000045 exactly: half-up gives ...05, banker's rounding ...04.
    assert calculate_cost("openai", "gpt-4o-mini", 30, 0) == Decimal("0.000005")
    # 10 tokens at 0.59/M = 0.0000059 -> 0.000006; 1 token -> 0.00000059 -> 0.000001
    assert calculate_cost("groq", "llama-3.3-70b-versatile", 10, 0) == Decimal("0.000006")
    assert calculate_cost("groq", "llama-3.3-70b-versatile", 1, 0) == Decimal("0.000001")


def test_cached_and_reasoning_tokens() -> None:
    # gpt-4o: 600 fresh input at 2.50, 400 cached at 1.25, 100 output at 10.00 per M.
    cost = calculate_cost("openai", "gpt-4o", 1000, 100, cached_input_tokens=400)
    assert cost == Decimal("0.003000")
    # No cached price (groq): cached tokens are billed as input.
    assert calculate_cost(
        "groq", "llama-3.3-70b-versatile", 1000, 0, cached_input_tokens=400
    ) == calculate_cost("groq", "llama-3.3-70b-versatile", 1000, 0)
    # A reasoning price applies to the reasoning part of the output.
    price = Price(Decimal("1"), Decimal("2"), reasoning_per_m=Decimal("4"))
    assert price.cost(0, 1000, reasoning_tokens=250) == Decimal("0.002500")  # 750*2 + 250*4
    # Counts beyond their total are clamped.
    assert price.cost(0, 100, reasoning_tokens=1000) == Decimal("0.000400")


def test_lookup_returns_the_price_used_case_insensitively() -> None:
    price = lookup_price("Groq", " LLaMA-3.3-70B-Versatile ")
    assert price is not None
    assert (price.input_per_m, price.output_per_m) == (Decimal("0.59"), Decimal("0.79"))
    assert price.source == f"shipped:{PRICE_TABLE_VERSION}"


async def test_model_prices_table_overrides_from_effective_date(pg: asyncpg.Connection) -> None:
    new_model = f"test-model-{uuid.uuid4().hex[:8]}"
    future = date(2999, 1, 1)
    await pg.execute(
        "INSERT INTO model_prices (provider, model, input_per_m, output_per_m, effective_from)"
        " VALUES ('groq', 'llama-3.3-70b-versatile', 1, 2, $1), ('groq', $2, 3, 4, $3)",
        future,
        new_model,
        date(2020, 1, 1),
    )
    try:
        book = PriceBook()
        assert book.lookup("groq", new_model) is None
        assert await book.refresh(pg) >= 2
        today = datetime.now(UTC).date()
        # Before effective_from the shipped price holds; on and after it, the override.
        assert book.calculate_cost("groq", "llama-3.3-70b-versatile", 10**6, 0, on=today) == (
            Decimal("0.590000")
        )
        assert book.calculate_cost("groq", "llama-3.3-70b-versatile", 10**6, 0, on=future) == (
            Decimal("1.000000")
        )
        override = book.lookup("groq", new_model)
        assert override is not None and override.source == "db"
        assert book.calculate_cost("groq", new_model, 10**6, 10**6) == Decimal("7.000000")
        assert book.lookup("groq", new_model, on=date(2019, 12, 31)) is None
        # The default book is not touched by another book's refresh.
        assert calculate_cost("groq", new_model, 1, 1) is None
    finally:
        await pg.execute(
            "DELETE FROM model_prices WHERE effective_from = $1 OR model = $2", future, new_model
        )


async def test_model_prices_rejects_negative_prices(pg: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await pg.execute(
            "INSERT INTO model_prices (provider, model, input_per_m, output_per_m,"
            " effective_from) VALUES ('groq', 'x-neg', -1, 0, '2024-01-01')"
        )


# --- served names that are not in the table: dated snapshots, aliases -----------------------


def test_a_dated_served_name_gets_its_base_models_price_by_prefix() -> None:
    book = PriceBook()
    price = book.lookup("openai", "gpt-4o-mini-2024-07-18")
    assert price is not None
    assert (price.input_per_m, price.output_per_m) == (Decimal("0.15"), Decimal("0.60"))
    assert (price.model, price.match) == ("gpt-4o-mini", "prefix")  # longest prefix, not gpt-4o
    gpt4o = book.lookup("openai", "GPT-4o-2024-08-06")
    assert gpt4o is not None and (gpt4o.model, gpt4o.match) == ("gpt-4o", "prefix")
    # Only at a '-' boundary: "gpt-4o-miniature" is not gpt-4o-mini, but is gpt-4o.
    odd = book.lookup("openai", "gpt-4o-miniature")
    assert odd is not None and odd.model == "gpt-4o"
    assert book.lookup("openai", "gpt-4") is None
    assert book.lookup("openai", "gpt") is None


def test_an_unknown_served_name_falls_back_to_the_requested_model() -> None:
    book = PriceBook()
    price = book.lookup("openrouter", "deepseek-r1-served-alias", requested="deepseek/deepseek-r1")
    assert price is not None and price.input_per_m == Decimal("0.55")
    assert (price.model, price.match) == ("deepseek/deepseek-r1", "requested")
    # The requested model comes before a prefix of the served name.
    both = book.lookup("openai", "gpt-4o-2024-08-06", requested="gpt-4o-mini")
    assert both is not None and (both.model, both.match) == ("gpt-4o-mini", "requested")
    # An exact served name wins over everything.
    exact = book.lookup("openai", "gpt-4o", requested="gpt-4o-mini")
    assert exact is not None and (exact.model, exact.match) == ("gpt-4o", "exact")
    assert book.lookup("openai", "no-such", requested="nor-this") is None


def test_the_row_says_which_price_it_was_charged() -> None:
    tracker = ModelUsageTracker("postgresql://unused@127.0.0.1:1/x")
    common: dict[str, Any] = {
        "tenant_id": uuid.uuid4(),
        "provider": "openai",
        "endpoint": "chat",
        "latency_ms": 1.0,
        "input_tokens": 10**6,
        "output_tokens": 0,
    }
    dated = tracker.make_record(
        model_name="gpt-4o-mini-2024-07-18", requested_model="gpt-4o-mini", **common
    )
    assert dated.estimated_cost_usd == Decimal("0.150000") and dated.price_known
    assert dated.metadata == {"price_model": "gpt-4o-mini", "price_match": "requested"}
    prefix = tracker.make_record(model_name="gpt-4o-2024-08-06", **common)
    assert prefix.estimated_cost_usd == Decimal("2.500000")
    assert prefix.metadata == {"price_model": "gpt-4o", "price_match": "prefix"}
    exact = tracker.make_record(model_name="gpt-4o", metadata={"a": 1}, **common)
    assert exact.metadata == {"a": 1}  # exact matches are not annotated
    unknown = tracker.make_record(model_name="mystery", requested_model="enigma", **common)
    assert unknown.estimated_cost_usd is None and not unknown.price_known
    assert unknown.metadata is None


async def test_router_rows_price_openais_dated_served_names(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    import json

    from llm_gateway import TenantLLMRouter, provider_settings
    from llm_gateway.simulator import SimulatedProvider
    from tests.conftest import make_tenant

    tenant = await make_tenant(
        pg, llm_tokens={"openai": "sk-t"}, inference_config={"preferred_provider": "openai"}
    )
    # OpenAI answers a request for gpt-4o-mini with its dated snapshot name.
    async with SimulatedProvider(name="openai", model="gpt-4o-mini-2024-07-18") as sim:
        providers = {"openai": provider_settings("openai", sim.base_url)}
        async with TenantLLMRouter(pg_dsn, providers=providers) as router:
            result = await router.complete_for_tenant(tenant, [{"role": "user", "content": "hi"}])
    assert result.model == "gpt-4o-mini-2024-07-18" and result.requested_model == "gpt-4o-mini"
    assert result.cost is not None and result.cost > 0
    [row] = await pg.fetch("SELECT * FROM model_usage_stats WHERE tenant_id = $1", tenant)
    assert row["estimated_cost_usd"] == result.cost and row["price_known"]
    assert row["input_price_per_m"] == Decimal("0.15")
    metadata = json.loads(row["metadata"])
    assert (metadata["price_model"], metadata["price_match"]) == ("gpt-4o-mini", "requested")
