"""Reading a chat request: the bearer key, the JSON body, and the routing hints in headers.

Only the fields the gateway acts on are read; every other body field goes to the provider
as it is (``temperature``, ``tools``, ``response_format``, ...), as the SDK passes ``params``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request

from .errors import ApiError

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ChatRequest", "bearer_key", "parse_chat", "read_body"]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
"""The largest chat request body read; larger ones get 413 (a client cannot make a worker
buffer an unbounded body)."""

USER_HEADER = "x-llm-gateway-user"
SESSION_HEADER = "x-llm-gateway-session"
TAGS_HEADER = "x-llm-gateway-tags"

# Body fields the gateway consumes; the rest are the provider's parameters.
_GATEWAY_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "user"})


@dataclass(slots=True)
class ChatRequest:
    """A parsed ``POST /v1/chat/completions``."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    user: str | None
    session_id: str | None
    tags: list[str] | None
    params: dict[str, Any] = field(default_factory=dict)


def bearer_key(headers: Mapping[str, str]) -> str:
    """The key of ``Authorization: Bearer <key>``; 401 when absent (never echoed back)."""
    value = headers.get("authorization", "")
    scheme, _, key = value.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise ApiError(
            401,
            "missing API key: send 'Authorization: Bearer <virtual key>'",
            code="invalid_api_key",
        )
    return key


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read up to ``limit`` bytes: a declared or streamed larger one is a 413."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise _too_large(limit)
        parts.append(part)
    return b"".join(parts)


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _tags(value: str | None) -> list[str] | None:
    if value is None:
        return None
    tags = [t.strip() for t in value.split(",")]
    return [t for t in tags if t] or None


def parse_chat(body: bytes, headers: Mapping[str, str]) -> ChatRequest:
    """The request, or a 400 naming what is wrong. Labels (session, tags) are validated
    later by the router, with the SDK's rules."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _bad("the request body is not valid JSON") from None
    if type(data) is not dict:
        raise _bad("the request body must be a JSON object")
    model = data.get("model")
    if type(model) is not str or not model:
        raise _bad("'model' is required: a model id or model group name", "model")
    messages = data.get("messages")
    if type(messages) is not list or not messages:
        raise _bad("'messages' must be a non-empty array", "messages")
    if not all(type(m) is dict for m in messages):
        raise _bad("each of 'messages' must be an object", "messages")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if type(stream) is not bool:
        raise _bad("'stream' must be a boolean", "stream")
    options = data.get("stream_options")
    if options is not None and type(options) is not dict:
        raise _bad("'stream_options' must be an object", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    user = data.get("user")
    if user is not None and type(user) is not str:
        raise _bad("'user' must be a string", "user")
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        # The header wins over the body: the gateway's own hint is the more deliberate one.
        user=headers.get(USER_HEADER) or user or None,
        session_id=headers.get(SESSION_HEADER) or None,
        tags=_tags(headers.get(TAGS_HEADER)),
        params={k: v for k, v in data.items() if k not in _GATEWAY_FIELDS},
    )
