"""What the simulated provider answers: behaviour names and OpenAI-shaped payloads.

Everything here is pure (no I/O): functions take the parsed request body and return the
JSON-ready objects or the already-encoded bytes that :mod:`.server` writes to the socket.
"""

from __future__ import annotations

import enum
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "BEHAVIOURS",
    "DEFAULT",
    "DEFAULT_MODEL",
    "HTML_BODY",
    "MALFORMED_BODY",
    "SSE_DONE",
    "STATUS_BEHAVIOURS",
    "STREAM_ONLY_BEHAVIOURS",
    "Behaviour",
    "LatencyDistribution",
    "as_behaviour",
    "dumps",
    "error_body",
    "loads",
    "sse",
]

try:  # orjson is optional: it is fast, but not a declared dependency of the project.
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised only where orjson is missing
    _orjson = None  # type: ignore[assignment]


def dumps(obj: Any) -> bytes:
    """Serialise ``obj`` to compact UTF-8 JSON bytes (orjson when available)."""
    if _orjson is not None:
        return _orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def loads(data: bytes) -> Any:
    """Parse JSON bytes (orjson when available); raises :class:`ValueError` on bad input."""
    if _orjson is not None:
        return _orjson.loads(data)
    return json.loads(data)


class _Default(enum.Enum):
    DEFAULT = "DEFAULT"


DEFAULT: Final = _Default.DEFAULT
"""Sentinel for :attr:`Behaviour.retry_after`: use the provider's ``retry_after``."""

DEFAULT_MODEL: Final = "sim-model"
"""Model reported when neither the constructor nor the request names one."""

# status code, OpenAI error ``type``, ``code`` and message for the plain HTTP error behaviours.
STATUS_BEHAVIOURS: Final[Mapping[str, tuple[int, str, str | None, str]]] = {
    "400": (400, "invalid_request_error", None, "Invalid request: 'messages' is malformed."),
    "context_length": (
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "This model's maximum context length is 8192 tokens. However, your messages resulted in"
        " 9000 tokens. Please reduce the length of the messages.",
    ),
    "401": (401, "invalid_request_error", "invalid_api_key", "Invalid API Key"),
    "404": (404, "invalid_request_error", "model_not_found", "The model does not exist."),
    "422": (422, "invalid_request_error", None, "Unprocessable entity."),
    "429": (
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        "Rate limit reached for requests per minute (RPM): Limit 10000, Used 10000, "
        "Requested 1. Please try again in 5.289s.",
    ),
    "500": (500, "server_error", None, "The server had an error while processing your request."),
    "503": (503, "service_unavailable", None, "The service is temporarily overloaded."),
}

STREAM_ONLY_BEHAVIOURS: Final = frozenset(
    {
        "stream_error_first",
        "stream_error_after_first",
        "groq_error_event",
        "stream_empty",
        "stream_malformed",
        "stall_after_first",
        "stall_before_first",
    }
)
"""Behaviours that only make sense for ``"stream": true``; other requests get ``"ok"``."""

BEHAVIOURS: Final = frozenset(
    {"ok", "drop", "hang", "malformed", "empty", "html", "empty_choices", "raw", "empty_answer"}
    | set(STATUS_BEHAVIOURS)
    | STREAM_ONLY_BEHAVIOURS
)
"""Every behaviour name accepted by ``fail_with`` and ``script()``."""

MALFORMED_BODY: Final = b'{"id": "x", "choices": ['
HTML_BODY: Final = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>502 Bad Gateway</h1><p>cloudflare</p></body></html>\n"
)


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the simulator answers one chat request; ``None`` fields use the provider's defaults.

    ``Behaviour("429", retry_after=2.5)`` or ``Behaviour("ok", content="hi", chunks=2)``.
    A plain string such as ``"429"`` is shorthand for ``Behaviour("429")``.
    """

    kind: str = "ok"
    """One of :data:`BEHAVIOURS`."""
    status: int | None = None
    """HTTP status override for the status behaviours ("400" ... "503")."""
    message: str | None = None
    """Error message override (status behaviours and in-band stream errors)."""
    retry_after: float | _Default | None = DEFAULT
    """``Retry-After`` seconds for "429"; ``None`` omits the header."""
    latency_ms: float | None = None
    """Delay before answering (overrides the provider's ``latency_ms``)."""
    content: str | None = None
    """Answer text (default: ``"[name] " + last user message``)."""
    chunks: int | None = None
    """Number of content chunks when streaming."""
    chunk_delay_ms: float | None = None
    """Pause between streamed chunks."""
    chunks_before_error: int | None = None
    """Content chunks sent before an in-band stream error (default 0, or 1 for *_after_first)."""
    prompt_tokens: int | None = None
    """Reported ``usage.prompt_tokens`` override."""
    completion_tokens: int | None = None
    """Reported ``usage.completion_tokens`` override."""
    cached_tokens: int | None = None
    """Reported ``usage.prompt_tokens_details.cached_tokens``."""
    reasoning_tokens: int | None = None
    """Reported ``usage.completion_tokens_details.reasoning_tokens``."""
    headers: Mapping[str, str] | None = None
    """Extra response headers (e.g. ``{"set-cookie": "__cf_bm=x"}``)."""
    body: Any = None
    """For "raw": the 200 body of a non-streamed answer (bytes as is, else encoded as JSON)."""
    events: tuple[Any, ...] | None = None
    """For "raw" streams: each item is sent as one SSE ``data:`` event, then ``[DONE]``."""

    def __post_init__(self) -> None:
        if self.kind not in BEHAVIOURS:
            known = ", ".join(sorted(BEHAVIOURS))
            raise ValueError(f"unknown simulator behaviour {self.kind!r}; known: {known}")


@dataclass(frozen=True, slots=True)
class LatencyDistribution:
    """A latency drawn per request, for tail-latency experiments (hedging, timeouts).

    A lognormal body around ``median_ms`` (``sigma``: the spread of its logarithm; 0 means
    always ``median_ms``) and, with probability ``tail_rate``, a slow tail around ``tail_ms``
    (same spread). ``LatencyDistribution(40, sigma=0.3, tail_rate=0.01, tail_ms=2000)``: 1 %
    of requests take about 2 s.
    """

    median_ms: float
    sigma: float = 0.0
    tail_rate: float = 0.0
    tail_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.median_ms < 0 or self.tail_ms < 0 or self.sigma < 0:
            raise ValueError("latencies and sigma must not be negative")
        if not 0.0 <= self.tail_rate <= 1.0:
            raise ValueError("tail_rate must be within [0, 1]")

    def sample(self, rng: random.Random) -> float:
        """One latency in milliseconds."""
        base = self.tail_ms if self.tail_rate and rng.random() < self.tail_rate else self.median_ms
        return base * math.exp(rng.gauss(0.0, self.sigma)) if self.sigma else base


_PLAIN: Final = {name: Behaviour(name) for name in BEHAVIOURS}


def as_behaviour(value: str | Behaviour) -> Behaviour:
    """Return ``value`` as a :class:`Behaviour` (strings map to default parameters)."""
    if isinstance(value, Behaviour):
        return value
    try:
        return _PLAIN[value]
    except KeyError:
        return Behaviour(value)  # raises a ValueError listing the known names


def error_body(kind: str, beh: Behaviour) -> tuple[int, bytes]:
    """Status code and OpenAI-style JSON error body for a status behaviour."""
    status, err_type, code, message = STATUS_BEHAVIOURS[kind]
    error = {
        "message": beh.message if beh.message is not None else message,
        "type": err_type,
        "param": None,
        "code": code,
    }
    return (beh.status if beh.status is not None else status), dumps({"error": error})


def sse(obj: Any, event: str | None = None) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + dumps(obj) + b"\n\n"


SSE_DONE: Final = b"data: [DONE]\n\n"
