"""OpenAI wire shapes: chat.completion and chat.completion.chunk objects, model lists, SSE.

Pure functions over the router's results, so the bytes the official ``openai`` clients parse
are decided in one place. No I/O, no framework.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import orjson

from ..providers.sse import StreamChunk
from ..types import CompletionResult

__all__ = [
    "SSE_DONE",
    "chunk_object",
    "completion_object",
    "dumps",
    "final_chunk",
    "model_list",
    "sse_event",
    "usage_chunk",
    "usage_object",
]

SSE_DONE: Final = b"data: [DONE]\n\n"
"""The last event of every stream: both official clients stop reading at it."""


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON (orjson: the response bodies are on the hot path)."""
    return orjson.dumps(obj)


def sse_event(obj: Any) -> bytes:
    """One server-sent event: ``data: <json>`` and the blank line that ends it."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage_object(tokens_input: int | None, tokens_output: int | None) -> dict[str, int]:
    """OpenAI's ``usage``; a count the provider did not report is 0 (clients expect ints)."""
    prompt, completion = tokens_input or 0, tokens_output or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion_object(result: CompletionResult, created: int) -> dict[str, Any]:
    """The ``chat.completion`` answering a non-streamed request.

    ``content`` is ``null`` when the answer is only tool calls, as OpenAI sends it.
    """
    message: dict[str, Any] = {"role": "assistant", "content": result.content}
    if result.tool_calls:
        message["tool_calls"] = result.tool_calls
        if not result.content:
            message["content"] = None
    return {
        "id": f"chatcmpl-{result.request_id.hex}",
        "object": "chat.completion",
        "created": created,
        "model": result.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": result.finish_reason or "stop",
            }
        ],
        "usage": usage_object(result.tokens_input, result.tokens_output),
    }


def _tool_deltas(deltas: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call deltas as OpenAI streams them: each with an integer ``index`` (both clients
    key the assembly of a call on it; some providers leave it out)."""
    out = []
    for position, delta in enumerate(deltas):
        item = dict(delta)
        if type(item.get("index")) is not int:
            item["index"] = position
        out.append(item)
    return out


def chunk_object(
    completion_id: str,
    created: int,
    chunk: StreamChunk,
    *,
    first: bool,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` for a piece of the router's stream. The first carries
    the assistant role, as OpenAI's does."""
    delta: dict[str, Any] = {}
    if first:
        delta["role"] = "assistant"
    if chunk.content or first:
        delta["content"] = chunk.content
    if chunk.tool_calls:
        delta["tool_calls"] = _tool_deltas(chunk.tool_calls)
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": chunk.model,
        "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": chunk.finish_reason}
        ],
    }


def final_chunk(completion_id: str, created: int, model: str, finish_reason: str) -> dict[str, Any]:
    """A closing chunk with only a finish reason (when the provider's last piece had none)."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(
    completion_id: str, created: int, model: str, result: CompletionResult | None
) -> dict[str, Any]:
    """The last chunk of a stream asked for with ``stream_options.include_usage``: no
    choices, the usage of the whole answer (as OpenAI sends it)."""
    tokens = (None, None) if result is None else (result.tokens_input, result.tokens_output)
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_object(*tokens),
    }


def model_list(models: Iterable[tuple[str, str]], created: int) -> dict[str, Any]:
    """``GET /v1/models``: ``{"object": "list", "data": [...]}`` from (id, owner) pairs."""
    return {
        "object": "list",
        "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": owner}
            for model_id, owner in models
        ],
    }
