"""The ``outcome`` label of a request (``llm_gateway_requests_total{outcome}``, the request
span's ``llm_gateway.outcome``) for every error class the gateway defines.

The labels are what dashboards and alerts select on (docs/grafana-dashboard.json sums by them):
a class must not change its label by accident, and a new error class gets one on purpose.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil

import pytest

import llm_gateway
from llm_gateway.errors import GatewayError
from llm_gateway.observability import request_outcome

# Every error class of the package and the label a request that ended with it is counted under.
LABELS: dict[str, str] = {
    "GatewayError": "error",
    "VirtualKeyError": "error",
    "ConfigError": "config_error",
    "UnknownProviderError": "config_error",
    "TenantNotFoundError": "config_error",
    "InvalidTenantConfigError": "config_error",
    "VirtualKeySpecError": "config_error",
    "InvalidModelGroupsError": "config_error",
    "InvalidDsnError": "config_error",
    "KeyRingError": "config_error",
    "DatabaseError": "config_error",
    "ConfigUnavailableError": "config_error",
    "DatabaseConnectError": "config_error",
    "InvalidRequestError": "invalid_request",
    "UnknownModelError": "invalid_request",
    "RouterClosedError": "router_closed",
    "NoProviderAvailableError": "no_provider",
    "ProviderError": "provider_error",
    "ProviderConnectionError": "provider_error",
    "ProviderTimeoutError": "provider_error",
    "RateLimitError": "provider_error",
    "ServerError": "provider_error",
    "MalformedResponseError": "provider_error",
    "EmptyResponseError": "provider_error",
    "AuthenticationError": "provider_error",
    "MidStreamError": "provider_error",
    "BadRequestError": "provider_error",
    "ContextWindowExceededError": "provider_error",
    "AllProvidersFailedError": "all_failed",
    "DeadlineExceededError": "deadline_exceeded",
    "QuotaExceededError": "quota_exceeded",
    "BudgetExceededError": "quota_exceeded",
}


def _error_classes() -> dict[str, type[GatewayError]]:
    """Every GatewayError subclass defined in the package (each module imported first)."""
    for info in pkgutil.walk_packages(llm_gateway.__path__, "llm_gateway."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    found: dict[str, type[GatewayError]] = {}
    todo: list[type[GatewayError]] = [GatewayError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("llm_gateway.") and cls.__name__ not in found:
            found[cls.__name__] = cls
            todo.extend(cls.__subclasses__())
    return found


CLASSES = _error_classes()


def test_every_error_class_has_a_label_here() -> None:
    assert sorted(CLASSES) == sorted(LABELS)


@pytest.mark.parametrize(("name", "label"), sorted(LABELS.items()))
def test_request_outcome_of_each_error_class(name: str, label: str) -> None:
    cls = CLASSES[name]
    # Without __init__: the label depends on the class only.
    assert request_outcome(cls.__new__(cls)) == label


@pytest.mark.parametrize(("name", "label"), sorted(LABELS.items()))
def test_each_error_class_names_its_outcome(name: str, label: str) -> None:
    assert CLASSES[name].outcome == label


def test_request_outcome_of_other_endings() -> None:
    assert request_outcome(None) == "success"
    assert request_outcome(asyncio.CancelledError()) == "cancelled"
    assert request_outcome(ValueError("not the gateway's")) == "error"
    assert request_outcome(KeyboardInterrupt()) == "error"
