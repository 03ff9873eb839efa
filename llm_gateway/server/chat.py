"""``POST /v1/chat/completions``: authenticate, check the model, call the router, answer.

The router does the work (config, admission, chain, attempts, usage rows); this module adds
the transport: the OpenAI JSON answer, or server-sent events for ``"stream": true``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..errors import GatewayError
from ..router import TenantLLMRouter
from ..streaming import CompletionStream
from .errors import ApiError, api_error
from .openai_shapes import (
    SSE_DONE,
    chunk_object,
    completion_object,
    dumps,
    final_chunk,
    sse_event,
    usage_chunk,
)
from .request import ChatRequest, parse_chat, read_body

if TYPE_CHECKING:
    from .state import Gateway
    from .virtual_keys import VirtualKey

__all__ = ["ENDPOINT", "chat_completions", "error_response", "json_response"]

ENDPOINT = "/v1/chat/completions"
"""The usage rows' ``endpoint``."""
_CUT_OFF = ApiError(
    503,
    "the gateway is shutting down and stopped this request; retry it",
    type="api_error",
    code="shutting_down",
    headers={"retry-after": "1"},
)

# Named parameters of the router's request methods (but the two the body carries): a body field
# of one of these names would not reach the provider but change the call (a deadline, another
# user's limits), so it is refused. Derived, so a new router argument is refused too.
_ROUTER_ARGUMENTS = frozenset(
    name
    for method in (TenantLLMRouter.complete_for_tenant, TenantLLMRouter.stream_for_tenant)
    for name, p in inspect.signature(method).parameters.items()
    if p.kind is not inspect.Parameter.VAR_KEYWORD
) - {"self", "messages", "model"}

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status, headers, media_type="application/json")


def error_response(error: ApiError) -> Response:
    return json_response(error.body(), error.status, error.headers)


def _call_arguments(chat: ChatRequest, key: VirtualKey) -> dict[str, Any]:
    """The router's keyword arguments for this request and key."""
    clash = _ROUTER_ARGUMENTS.intersection(chat.params)
    if clash:
        name = min(clash)
        raise ApiError(400, f"parameter {name!r} is not supported by the gateway", param=name)
    return {
        "endpoint": ENDPOINT,
        # A key issued to a user is that user's: its requests count against that user's limits.
        "user_id": key.user_id or chat.user,
        "session_id": chat.session_id,
        "tags": chat.tags,
        "model": chat.model,
        # Always given, limits or not: the rows then carry the key's id (virtual_key_id).
        "key_quota": key.quota,
        **chat.params,
    }


async def chat_completions(request: Request) -> Response:
    """The OpenAI chat completions endpoint, streamed or not."""
    gateway: Gateway = request.app.state.gateway
    try:
        key = await gateway.authenticate(request.headers)
        chat = parse_chat(await read_body(request, gateway.max_body_bytes), request.headers)
        if not gateway.keys.allows_model(key, chat.model):
            raise ApiError(
                403,
                f"this key may not use model {chat.model!r}",
                type="permission_error",
                param="model",
                code="model_not_allowed",
            )
        arguments = _call_arguments(chat, key)
        if chat.stream:
            stream = await gateway.router.stream_for_tenant(
                key.tenant_id, chat.messages, **arguments
            )
            return await _stream_response(stream, chat.include_usage)
        result = await gateway.router.complete_for_tenant(key.tenant_id, chat.messages, **arguments)
    except Exception as exc:
        return error_response(api_error(exc))
    except asyncio.CancelledError:
        # uvicorn cancels what still runs when its shutdown bound passes. No byte of the answer
        # went out yet: answer in the OpenAI shape (clients retry a 503) rather than let it
        # send a plain-text 500. The router has written the attempt's row (cancelled).
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return error_response(_CUT_OFF)
    return json_response(
        completion_object(result, int(time.time())),
        headers={"x-llm-gateway-provider": result.provider},
    )


async def _stream_response(stream: CompletionStream, include_usage: bool) -> Response:
    """Server-sent events of an open stream. Its first chunk is already read (the router
    returns a stream only once content arrived), so the provider is known for the headers."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = None  # a stream that ended without content but is no empty answer
    except BaseException:
        await stream.aclose()
        raise
    headers = dict(_SSE_HEADERS)
    if first is not None:
        headers["x-llm-gateway-provider"] = first.provider
    return StreamingResponse(
        _events(stream, first, include_usage),
        media_type="text/event-stream",
        headers=headers,
    )


async def _events(
    stream: CompletionStream, first: Any, include_usage: bool
) -> AsyncIterator[bytes]:
    """``data: {chunk}`` for each piece, a closing chunk, usage if asked, ``data: [DONE]``.

    A failure after content was sent (:class:`MidStreamError`) cannot change the status any
    more: it is sent as an ``{"error": ...}`` event, which both openai clients raise.
    Closing the stream (here, or by a client that went away) writes its usage row.
    """
    completion_id = f"chatcmpl-{stream.request_id.hex}"  # as a non-streamed answer's id
    created = int(time.time())
    model = first.model if first is not None else ""
    finished = False
    async with stream:
        try:
            chunk = first
            is_first = True
            while chunk is not None:
                model = chunk.model
                finished = finished or chunk.finish_reason is not None
                yield sse_event(chunk_object(completion_id, created, chunk, first=is_first))
                is_first = False
                chunk = await anext(stream, None)
        except GatewayError as exc:
            yield sse_event(api_error(exc).body())
            return
        result = stream.result
        if not finished:
            reason = (result.finish_reason if result is not None else None) or "stop"
            yield sse_event(final_chunk(completion_id, created, model, reason))
        if include_usage:
            yield sse_event(usage_chunk(completion_id, created, model, result))
        yield SSE_DONE
