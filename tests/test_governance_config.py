"""Governance sections of inference_config: validation messages and default merging."""

from __future__ import annotations

from datetime import date

import pytest
from pydantic import ValidationError

from llm_gateway.governance.config import Governance, parse_default_limits


def error_of(raw: dict[str, object]) -> tuple[str, str]:
    with pytest.raises(ValidationError) as info:
        Governance.model_validate(raw)
    first = info.value.errors(include_url=False)[0]
    return ".".join(str(p) for p in first["loc"]), first["msg"]


def test_full_example_validates() -> None:
    g = Governance.model_validate(
        {
            "budget": {"max_usd": 50.0, "period": "1mo", "alert_at": [1.0, 0.5, 0.8]},
            "limits": {"requests_per_minute": 600, "tokens_per_minute": 200000},
            "user_limits": {"max_usd": 2, "period": "1d", "requests_per_minute": 20},
            "system_keys": {"max_usd": 5.0, "requests_per_minute": 30, "anchor": "2026-01-15"},
            "something_newer": {"ignored": True},
        }
    )
    assert g.budget is not None and g.budget.alert_at == (0.5, 0.8, 1.0)
    assert g.budget.on_exhausted == "refuse" and not g.budget.allow_unpriced
    assert g.limits is not None and g.limits.rate_items() == [
        ("requests_per_minute", 600),
        ("tokens_per_minute", 200000),
    ]
    assert g.user_limits is not None and g.user_limits.period == "1d"
    assert g.system_keys is not None and g.system_keys.anchor == date(2026, 1, 15)


@pytest.mark.parametrize(
    ("raw", "path", "fragment"),
    [
        ({"budget": {"max_usd": "50"}}, "budget.max_usd", "number of US dollars"),
        ({"budget": {"max_usd": True}}, "budget.max_usd", "number of US dollars"),
        ({"budget": {"max_usd": -1}}, "budget.max_usd", "greater than or equal to 0"),
        ({"budget": {"period": "1mo"}}, "budget", "a budget needs max_usd"),
        ({"budget": {"max_usd": 1, "period": "2w"}}, "budget.period", "'1m'"),
        ({"budget": {"max_usd": 1, "alert_at": [0.5, 1.5]}}, "budget.alert_at", "(0, 1]"),
        ({"budget": {"max_usd": 1, "alert_at": 0.5}}, "budget.alert_at", "list of fractions"),
        ({"budget": {"max_usd": 1, "on_exhausted": "x"}}, "budget.on_exhausted", "'cheapest'"),
        ({"limits": {"requests_per_minute": 0}}, "limits.requests_per_minute", "greater than 0"),
        ({"limits": {"requests_per_minute": 1.5}}, "limits.requests_per_minute", "integer"),
        ({"user_limits": {"requests_per_day": "10"}}, "user_limits.requests_per_day", "integer"),
        ({"system_keys": {"anchor": "yesterday"}}, "system_keys.anchor", "date"),
    ],
)
def test_bad_values_name_their_path(raw: dict[str, object], path: str, fragment: str) -> None:
    got_path, message = error_of(raw)
    assert got_path == path
    assert fragment in message


def test_default_limits_merge_by_section() -> None:
    default = parse_default_limits(
        {"system_keys": {"max_usd": 1.0}, "limits": {"requests_per_minute": 100}}
    )
    tenant = Governance.model_validate({"limits": {"tokens_per_minute": 5000}})
    merged = tenant.merged_over(default)
    # The tenant's `limits` replaces the default's whole section (no rpm from the default).
    assert merged.limits is not None and merged.limits.rate_items() == [("tokens_per_minute", 5000)]
    assert merged.system_keys is not None and merged.system_keys.max_usd == 1.0
    assert merged.budget is None and merged.user_limits is None
    assert Governance().merged_over(None).empty
    assert not merged.empty
