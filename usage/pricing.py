"""Model prices and cost calculation.

Prices are US dollars per million tokens, as :class:`~decimal.Decimal`. The shipped table below
is versioned with the package (:data:`PRICE_TABLE_VERSION`); the ``model_prices`` table
(migration 003) overrides it per provider and model from an ``effective_from`` date on, and a
:class:`PriceBook` holds both. Every usage row stores the prices it was charged at, so an old
invoice can be recomputed after prices change.

Token conventions (as OpenAI-compatible APIs report them): ``input_tokens`` *includes*
``cached_input_tokens`` and ``output_tokens`` *includes* ``reasoning_tokens``. Cached input is
billed at ``cached_input_per_m`` where the model has one, reasoning output at
``reasoning_per_m`` where it has one; otherwise they are billed like the tokens they are part of.

Providers often answer with a name the table does not list (OpenAI serves ``gpt-4o-mini`` as
``gpt-4o-mini-2024-07-18``). :meth:`PriceBook.lookup` then falls back, in order, to the
requested model, to the longest table name that the served name extends at a ``-``
boundary, and to the provider's wildcard price; the :class:`Price` it returns says which
(``model``, ``match``), and the usage row records it in ``metadata`` (``price_model``,
``price_match``) whenever it was not an exact match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final, Literal, Protocol

__all__ = [
    "PRICE_TABLE_VERSION",
    "SHIPPED_PRICES",
    "WILDCARD_MODEL",
    "Price",
    "PriceBook",
    "PriceMatch",
    "calculate_cost",
    "default_price_book",
    "lookup_price",
]

log = logging.getLogger("usage")

#: Version of the shipped table; bump it with every price change so rows can be traced to it.
PRICE_TABLE_VERSION: Final = "2025.01"

#: A model name that prices every model of a provider (used for ``local``).
WILDCARD_MODEL: Final = "*"

#: How a price was found for a served model name: the name itself, the requested model, the
#: longest table name it extends at a "-" (``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``), or
#: the provider's wildcard.
PriceMatch = Literal["exact", "requested", "prefix", "wildcard"]

_MILLION: Final = Decimal(1_000_000)
_SIX_PLACES: Final = Decimal("0.000001")


@dataclass(frozen=True, slots=True)
class Price:
    """The price of one model, per million tokens, from ``effective_from`` on."""

    input_per_m: Decimal
    output_per_m: Decimal
    cached_input_per_m: Decimal | None = None
    reasoning_per_m: Decimal | None = None
    effective_from: date = date.min
    source: str = f"shipped:{PRICE_TABLE_VERSION}"
    model: str = ""
    """The table's model name this price is listed under (set by :class:`PriceBook`)."""
    match: PriceMatch = "exact"
    """How :meth:`PriceBook.lookup` reached it from the name it was asked for."""

    def cost(
        self,
        input_tokens: int | None,
        output_tokens: int | None,
        *,
        cached_input_tokens: int | None = None,
        reasoning_tokens: int | None = None,
    ) -> Decimal | None:
        """Cost in USD rounded to 6 places (half up); ``None`` when a count is missing."""
        if input_tokens is None or output_tokens is None or input_tokens < 0 or output_tokens < 0:
            return None
        # Whole-token products first, one division at the end: exact before the final rounding.
        total = self.input_per_m * input_tokens + self.output_per_m * output_tokens
        if cached_input_tokens and self.cached_input_per_m is not None:
            cached = min(max(cached_input_tokens, 0), input_tokens)
            total += (self.cached_input_per_m - self.input_per_m) * cached
        if reasoning_tokens and self.reasoning_per_m is not None:
            reasoning = min(max(reasoning_tokens, 0), output_tokens)
            total += (self.reasoning_per_m - self.output_per_m) * reasoning
        return (total / _MILLION).quantize(_SIX_PLACES, rounding=ROUND_HALF_UP)


def _p(inp: str, out: str, cached: str | None = None) -> Price:
    return Price(Decimal(inp), Decimal(out), Decimal(cached) if cached is not None else None)


#: The shipped table: provider -> model -> price. ``local`` prices every model at zero.
SHIPPED_PRICES: Final[dict[str, dict[str, Price]]] = {
    "groq": {
        "llama-3.3-70b-versatile": _p("0.59", "0.79"),
        "llama-3.1-70b-versatile": _p("0.59", "0.79"),
        "mixtral-8x7b-32768": _p("0.24", "0.24"),
        "llama-3.1-8b-instant": _p("0.05", "0.08"),
    },
    "openrouter": {
        "deepseek/deepseek-r1": _p("0.55", "2.19"),
        "anthropic/claude-3.5-sonnet": _p("3", "15"),
        "google/gemini-pro-1.5": _p("1.25", "5"),
    },
    "llm7": {
        "gpt-4o-mini": _p("0.15", "0.60"),
        "gpt-4o": _p("5", "15"),
        "gpt-4-turbo": _p("10", "30"),
    },
    "openai": {
        "gpt-4o-mini": _p("0.15", "0.60", cached="0.075"),
        "gpt-4o": _p("2.50", "10.00", cached="1.25"),
    },
    "local": {WILDCARD_MODEL: _p("0", "0")},
}


class _Fetcher(Protocol):
    async def fetch(self, query: str, *args: Any) -> list[Any]: ...


_OVERRIDES_SQL = """
SELECT provider, model, input_per_m, output_per_m, cached_input_per_m, reasoning_per_m,
       effective_from
FROM model_prices
ORDER BY provider, model, effective_from
"""

# Per key, the prices newest first: a lookup walks until effective_from <= the row's date.
_Table = dict[tuple[str, str], tuple[Price, ...]]


def _key(provider: str, model: str) -> tuple[str, str]:
    return provider.strip().lower(), model.strip().lower()


class PriceBook:
    """Shipped prices plus the overrides of the ``model_prices`` table.

    Lookups are dictionary lookups with no I/O; :meth:`refresh` reloads the overrides and
    swaps the whole table at once, so a lookup never sees half of a refresh.
    """

    def __init__(
        self,
        shipped: dict[str, dict[str, Price]] | None = None,
        overrides: list[tuple[str, str, Price]] | None = None,
    ) -> None:
        self._shipped = SHIPPED_PRICES if shipped is None else shipped
        self._table: _Table = {}
        self._fallbacks: dict[PriceMatch, _Table] = {}
        self._load(overrides or [])

    def _load(self, overrides: list[tuple[str, str, Price]]) -> None:
        merged: dict[tuple[str, str], list[Price]] = {}
        for provider, models in self._shipped.items():
            for model, price in models.items():
                merged.setdefault(_key(provider, model), []).append(price)
        for provider, model, price in overrides:
            merged.setdefault(_key(provider, model), []).append(price)
        table: _Table = {
            key: tuple(
                replace(p, model=key[1], match="exact")
                for p in sorted(prices, key=lambda p: p.effective_from, reverse=True)
            )
            for key, prices in merged.items()
        }
        # The same prices marked with each fallback, made once so a lookup never allocates.
        fallbacks: dict[PriceMatch, _Table] = {
            match: {
                key: tuple(replace(p, match=match) for p in prices) for key, prices in table.items()
            }
            for match in ("requested", "prefix", "wildcard")
        }
        self._table, self._fallbacks = table, fallbacks  # one swap: no half-refreshed view

    @property
    def override_count(self) -> int:
        """How many ``model_prices`` rows the last :meth:`refresh` loaded."""
        return sum(1 for prices in self._table.values() for p in prices if p.source == "db")

    async def refresh(self, pool: _Fetcher) -> int:
        """Reload the overrides from ``model_prices`` (through a pool or a connection).

        Returns the number of override rows. A missing table (migration 003 not applied) leaves
        the shipped prices in place and returns 0; other database errors propagate.
        """
        import asyncpg

        try:
            rows = await pool.fetch(_OVERRIDES_SQL)
        except asyncpg.UndefinedTableError:
            log.warning("model_prices table missing; using shipped prices only")
            rows = []
        self._load(
            [
                (
                    r["provider"],
                    r["model"],
                    Price(
                        r["input_per_m"],
                        r["output_per_m"],
                        r["cached_input_per_m"],
                        r["reasoning_per_m"],
                        r["effective_from"],
                        "db",
                    ),
                )
                for r in rows
            ]
        )
        return len(rows)

    def lookup(
        self, provider: str, model: str, on: date | None = None, requested: str | None = None
    ) -> Price | None:
        """The price charged for a row of ``on`` (default: today, UTC); ``None`` if unknown.

        ``model`` is the served name; when the table does not list it, the price of
        ``requested``, else of the longest listed name ``model`` extends at a ``-``
        (``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``), else the provider's wildcard.
        The result's ``model`` and ``match`` say which.
        """
        table = self._table
        prices = table.get((provider, model))
        if prices is None:
            key = _key(provider, model)
            prices = table.get(key) or self._fallback(key, requested)
            if prices is None:
                return None
        if on is None:
            on = datetime.now(UTC).date()
        for price in prices:
            if price.effective_from <= on:
                return price
        return None

    def _fallback(self, key: tuple[str, str], requested: str | None) -> tuple[Price, ...] | None:
        provider, model = key
        fallbacks = self._fallbacks
        if requested is not None:
            prices = fallbacks["requested"].get(_key(provider, requested))
            if prices is not None:
                return prices
        prefixed = fallbacks["prefix"]
        cut = model.rfind("-")
        while cut > 0:
            prices = prefixed.get((provider, model[:cut]))
            if prices is not None:
                return prices
            cut = model.rfind("-", 0, cut)
        return fallbacks["wildcard"].get((provider, WILDCARD_MODEL))

    def calculate_cost(
        self,
        provider: str,
        model: str,
        input_tokens: int | None,
        output_tokens: int | None,
        *,
        cached_input_tokens: int | None = None,
        reasoning_tokens: int | None = None,
        on: date | None = None,
    ) -> Decimal | None:
        """Cost in USD (6 places, half up); ``None`` for an unknown model or missing counts."""
        price = self.lookup(provider, model, on)
        if price is None:
            return None
        return price.cost(
            input_tokens,
            output_tokens,
            cached_input_tokens=cached_input_tokens,
            reasoning_tokens=reasoning_tokens,
        )


_DEFAULT_BOOK = PriceBook()


def default_price_book() -> PriceBook:
    """The process-wide book: shipped prices, plus the ``model_prices`` overrides once a
    :class:`~usage.ModelUsageTracker` using it has started (it refreshes its book at start and
    at each maintenance interval). :func:`calculate_cost` prices with this book."""
    return _DEFAULT_BOOK


def lookup_price(
    provider: str, model: str, on: date | None = None, requested: str | None = None
) -> Price | None:
    """The price the default book charges for ``provider``/``model``; ``None`` if unknown."""
    return _DEFAULT_BOOK.lookup(provider, model, on, requested)


def calculate_cost(
    provider: str,
    model: str,
    input_tokens: int | None,
    output_tokens: int | None,
    *,
    cached_input_tokens: int | None = None,
    reasoning_tokens: int | None = None,
) -> Decimal | None:
    """Estimated cost in USD, rounded to 6 places (``ROUND_HALF_UP``), with the default book.

    ``None`` (never 0) for a model without a known price, and when ``input_tokens`` or
    ``output_tokens`` is missing. ``local`` models cost 0.
    """
    return _DEFAULT_BOOK.calculate_cost(
        provider,
        model,
        input_tokens,
        output_tokens,
        cached_input_tokens=cached_input_tokens,
        reasoning_tokens=reasoning_tokens,
    )
