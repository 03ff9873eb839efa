"""Server-sent events of a chat-completion stream, parsed into dicts (or typed errors)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from ..errors import (
    AuthenticationError,
    BadRequestError,
    MalformedResponseError,
    ProviderError,
    RateLimitError,
    ServerError,
)
from .base import _loads


def in_band_error(error: object, provider: str, model: str) -> ProviderError:
    """The typed error for an error object sent inside a 200 stream (OpenRouter, Groq)."""
    message = "in-band error"
    code: object = None
    if isinstance(error, Mapping):
        message = str(error.get("message") or message)
        code = error.get("code") or error.get("status")
    status = code if isinstance(code, int) else None
    if status == 429:
        return RateLimitError(message, provider=provider, model=model)
    if status in (401, 403):
        return AuthenticationError(message, provider=provider, model=model, status_code=status)
    if status in (400, 404, 422):
        return BadRequestError(message, provider=provider, model=model, status_code=status)
    return ServerError(
        f"in-band error: {message}", provider=provider, model=model, status_code=status
    )


async def iter_events(
    lines: AsyncIterator[str], provider: str, model: str
) -> AsyncIterator[dict[str, Any]]:
    """Yield each ``data:`` JSON object until ``[DONE]`` or the end of the stream.

    Raises the typed error of an ``event: error`` or of a chunk carrying an ``error`` object,
    and :class:`MalformedResponseError` for data that is not a JSON object.
    """
    event: str | None = None
    data: list[str] = []
    async for line in lines:
        if line:
            if line.startswith(":"):
                continue  # comment / keep-alive
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            continue
        if not data:
            event = None
            continue
        payload = "\n".join(data)
        data.clear()
        if payload == "[DONE]":
            # Read the (empty) rest of the body so the connection goes back to the pool; a
            # server that keeps talking after [DONE] is cut off by the stream's aclose().
            for _ in range(8):
                if await anext(lines, None) is None:
                    break
            return
        try:
            obj = _loads(payload)
        except ValueError:
            raise MalformedResponseError(
                f"stream event is not JSON ({payload[:40]!r})", provider=provider, model=model
            ) from None
        if not isinstance(obj, dict):
            raise MalformedResponseError(
                "stream event is not an object", provider=provider, model=model
            )
        if event == "error" or "error" in obj:
            raise in_band_error(obj.get("error", obj), provider, model)
        event = None
        yield obj
    if data:  # a last event without its blank line
        payload = "\n".join(data)
        if payload != "[DONE]":
            try:
                obj = _loads(payload)
            except ValueError:
                raise MalformedResponseError(
                    "stream ended inside an event", provider=provider, model=model
                ) from None
            if isinstance(obj, dict):
                if event == "error" or "error" in obj:
                    raise in_band_error(obj.get("error", obj), provider, model)
                yield obj
