"""What the gateway answers for each error: HTTP status, OpenAI error body, headers.

Every failure reaches the caller as ``{"error": {"message", "type", "param", "code"}}``, the
shape both official ``openai`` clients turn into their typed exceptions; never a stack trace.
Messages come from llm-gateway's own errors, which never carry a key.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from ..errors import (
    AllProvidersFailedError,
    BadRequestError,
    ConfigError,
    ContextWindowExceededError,
    DatabaseError,
    DeadlineExceededError,
    GatewayError,
    InvalidRequestError,
    NoProviderAvailableError,
    ProviderError,
    RouterClosedError,
    TenantNotFoundError,
    UnknownModelError,
)
from ..governance.errors import BudgetExceededError, QuotaExceededError

__all__ = ["ApiError", "api_error"]

log = logging.getLogger("llm_gateway.server")


class ApiError(Exception):
    """An answer of the gateway that is an error: ``status`` and the OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _retry_headers(seconds: float | None) -> dict[str, str]:
    """``Retry-After`` in whole seconds (HTTP allows nothing finer), rounded up, and the
    ``retry-after-ms`` that the openai clients read first."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return {}
    return {
        "retry-after": str(math.ceil(seconds)),
        "retry-after-ms": str(math.ceil(seconds * 1000)),
    }


def _provider_bad_request(exc: BadRequestError) -> ApiError:
    # The provider's own words: the caller has to fix the request, and needs to know how.
    code = "context_length_exceeded" if isinstance(exc, ContextWindowExceededError) else None
    if exc.status_code == 404:
        return ApiError(404, exc.message, code=code or "not_found")
    return ApiError(400, exc.message, code=code)


def api_error(exc: BaseException) -> ApiError:
    """The answer for an exception raised while serving a request (unknown ones: 500).

    Its codes are the HTTP API's (the README's table); a request's metrics label is the
    error's own ``outcome``, not decided here, even where the two are spelled alike.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QuotaExceededError):
        code = "budget_exceeded" if isinstance(exc, BudgetExceededError) else "rate_limit_exceeded"
        return ApiError(
            429,
            str(exc),
            type="rate_limit_error",
            code=code,
            headers=_retry_headers(exc.retry_after),
        )
    if isinstance(exc, UnknownModelError):
        # What OpenAI answers for a model that does not exist (the clients' NotFoundError).
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), param=exc.parameter)
    if isinstance(exc, BadRequestError):
        return _provider_bad_request(exc)
    if isinstance(exc, DeadlineExceededError):
        return ApiError(504, str(exc), type="timeout_error", code="deadline_exceeded")
    if isinstance(exc, AllProvidersFailedError) and exc.rate_limited:
        # Every provider said "slow down": a 429 the clients back off on, not a 502 they drop.
        return ApiError(
            429,
            str(exc),
            type="rate_limit_error",
            code="upstream_rate_limited",
            headers=_retry_headers(exc.retry_after),
        )
    if isinstance(exc, AllProvidersFailedError):
        last = exc.last_error
        detail = f"{exc}" + (f"; last error: {last}" if last else "")
        return ApiError(502, detail, type="api_error", code="all_providers_failed")
    if isinstance(exc, NoProviderAvailableError):
        return ApiError(503, str(exc), type="api_error", code="no_provider_available")
    if isinstance(exc, RouterClosedError):
        return ApiError(503, "the gateway is shutting down", type="api_error", code="shutting_down")
    if isinstance(exc, ProviderError):  # a final error the router passed on as it was
        return ApiError(502, str(exc), type="api_error", code="provider_error")
    if isinstance(exc, TenantNotFoundError):
        # The key's tenant is gone: the credential no longer names anything.
        return ApiError(401, "the key's tenant does not exist", code="invalid_api_key")
    if isinstance(exc, DatabaseError):
        return ApiError(503, "the gateway's database is unavailable", type="api_error")
    if isinstance(exc, ConfigError):
        log.warning("tenant configuration error: %s", exc)
        return ApiError(500, str(exc), type="server_error", code="invalid_tenant_config")
    if isinstance(exc, GatewayError):
        return ApiError(500, str(exc), type="server_error")
    log.error("unexpected error serving a request", exc_info=exc)
    return ApiError(500, "internal error", type="server_error")
