"""Classifies every failure of a provider call, in one place, into the gateway's errors.

Both official SDKs (openai, groq) are generated from the same template, so their exception
classes carry the same attributes; they are matched by those, not by module.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import groq
import httpx
import httpx2
import openai

from ..errors import (
    AuthenticationError,
    BadRequestError,
    ContextWindowExceededError,
    MalformedResponseError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    RateLimitError,
    ServerError,
)
from ..keys import ApiKey

_TIMEOUT = (openai.APITimeoutError, groq.APITimeoutError)
_CONNECTION = (openai.APIConnectionError, groq.APIConnectionError)
_STATUS = (openai.APIStatusError, groq.APIStatusError)
_VALIDATION = (openai.APIResponseValidationError, groq.APIResponseValidationError)
# Raised unwrapped by the SDKs while a streamed body is read.
_HTTP_TIMEOUT = (httpx.TimeoutException, httpx2.TimeoutException)
_HTTP_TRANSPORT = (httpx.TransportError, httpx2.TransportError)

# Groq puts the wait in the message: "Please try again in 5.289s" / "in 1m2.5s" / "in 590ms".
_TRY_AGAIN = re.compile(r"try again in (?:(\d+)m(?!s))?(?:([\d.]+)(ms|s))?", re.IGNORECASE)
_MAX_MESSAGE = 500
# A 400 for a request longer than the model's window. OpenAI and Groq send the code
# "context_length_exceeded"; OpenRouter sends "code": 400 and says it in the message
# ("This endpoint's maximum context length is 163840 tokens"), as do DeepSeek and others.
_CONTEXT_CODE = "context_length_exceeded"
_CONTEXT_MESSAGE = re.compile(
    r"maximum context length|context[ _]length[ _]exceeded|exceeds? the context window",
    re.IGNORECASE,
)
_CONTEXT_LIMIT = re.compile(r"maximum context length is (\d+)", re.IGNORECASE)


def _seconds(value: str, scale: float = 1.0) -> float | None:
    """A finite, non-negative number of seconds, or ``None`` for anything else ("nan", "inf")."""
    try:
        seconds = float(value) / scale
    except ValueError:
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def parse_retry_after(headers: Mapping[str, str] | None, message: str = "") -> float | None:
    """Seconds to wait before using the same key again, from headers or the error message.

    Never NaN, infinite or negative (a value in the past is 0). Not capped here: how long a
    key may be skipped is :class:`~llm_gateway.health.HealthRegistry`'s ``max_retry_after``.
    """
    if headers:
        ms = headers.get("retry-after-ms")
        if ms and (seconds := _seconds(ms, 1000.0)) is not None:
            return seconds
        value = headers.get("retry-after")
        if value:
            seconds = _seconds(value)
            if seconds is not None:
                return seconds
            parsed = None
            if "," in value:
                with contextlib.suppress(ValueError, TypeError, OverflowError):
                    parsed = email.utils.parsedate_to_datetime(value)
            if parsed is not None:
                if parsed.tzinfo is None:  # "-0000": HTTP dates are GMT
                    parsed = parsed.replace(tzinfo=datetime.UTC)
                return max(0.0, parsed.timestamp() - time.time())
    match = _TRY_AGAIN.search(message)
    if match and (match[1] or match[2]):
        minutes = float(match[1] or 0)
        amount = float(match[2] or 0)
        seconds = minutes * 60 + (amount / 1000 if match[3] == "ms" else amount)
        return seconds if math.isfinite(seconds) else None
    return None


def _body_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        error = body.get("error", body)
        if isinstance(error, Mapping) and error.get("message"):
            return str(error["message"])
    return str(getattr(exc, "message", "") or type(exc).__name__)


def _context_exceeded(exc: Any, message: str) -> bool:
    body = getattr(exc, "body", None)
    error = body.get("error", body) if isinstance(body, Mapping) else None
    code = error.get("code") if isinstance(error, Mapping) else None
    return code == _CONTEXT_CODE or _CONTEXT_MESSAGE.search(message) is not None


def _scrub(message: str, key: ApiKey | None) -> str:
    if key is not None:
        message = message.replace(key.reveal(), f"<{key.source} key>")
    return message[:_MAX_MESSAGE]


def classify(
    exc: BaseException, provider: str, model: str | None, key: ApiKey | None = None
) -> ProviderError:
    """The gateway error for an exception raised by an SDK call (never re-raises it)."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, (*_TIMEOUT, *_HTTP_TIMEOUT)):
        return ProviderTimeoutError("request timed out", provider=provider, model=model)
    if isinstance(exc, _HTTP_TRANSPORT):
        return ProviderConnectionError(
            f"connection error ({type(exc).__name__})", provider=provider, model=model
        )
    if isinstance(exc, _CONNECTION):
        cause = exc.__cause__ or exc.__context__
        detail = type(cause).__name__ if cause is not None else "connection failed"
        return ProviderConnectionError(
            f"connection error ({detail})", provider=provider, model=model
        )
    if isinstance(exc, _STATUS):
        code = exc.status_code
        message = _scrub(_body_message(exc), key)
        if code == 429:
            retry_after = parse_retry_after(exc.response.headers, message)
            return RateLimitError(message, provider=provider, model=model, retry_after=retry_after)
        if code in (401, 403):
            return AuthenticationError(message, provider=provider, model=model, status_code=code)
        if code in (408, 409) or code >= 500:
            return ServerError(message, provider=provider, model=model, status_code=code)
        if code in (400, 413) and _context_exceeded(exc, message):
            limit = _CONTEXT_LIMIT.search(message)
            return ContextWindowExceededError(
                message,
                provider=provider,
                model=model,
                status_code=code,
                limit=int(limit[1]) if limit else None,
            )
        return BadRequestError(message, provider=provider, model=model, status_code=code)
    if isinstance(exc, (*_VALIDATION, ValueError)):
        return MalformedResponseError(
            f"unreadable response ({type(exc).__name__})", provider=provider, model=model
        )
    if isinstance(exc, TimeoutError):
        return ProviderTimeoutError("request timed out", provider=provider, model=model)
    if isinstance(exc, OSError):
        return ProviderConnectionError(
            f"connection error ({type(exc).__name__})", provider=provider, model=model
        )
    return ProviderError(
        f"unexpected {type(exc).__name__}: {_scrub(str(exc), key)}", provider=provider, model=model
    )
