"""Server-sent events of a chat-completion stream, parsed into dicts (or typed errors)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import (
    AuthenticationError,
    BadRequestError,
    MalformedResponseError,
    ProviderError,
    RateLimitError,
    ServerError,
)
from .response import _loads, token_count, token_detail, tool_call_list

_NO_DELTA: Mapping[str, Any] = {}


def in_band_error(error: object, provider: str, model: str) -> ProviderError:
    """The typed error for an error object sent inside a 200 stream (OpenRouter, Groq)."""
    message = "in-band error"
    code: object = None
    if isinstance(error, Mapping):
        message = str(error.get("message") or message)
        code = error.get("code") or error.get("status")
    status = code if type(code) is int else None  # not a bool
    if status == 429:
        return RateLimitError(message, provider=provider, model=model)
    if status in (401, 403):
        return AuthenticationError(message, provider=provider, model=model, status_code=status)
    if status in (400, 404, 422):
        return BadRequestError(message, provider=provider, model=model, status_code=status)
    return ServerError(
        f"in-band error: {message}", provider=provider, model=model, status_code=status
    )


def _decode(payload: str, event: str | None, provider: str, model: str) -> dict[str, Any]:
    """One event's data as a chunk object, or the typed error it carries."""
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
    return obj


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
        yield _decode(payload, event, provider, model)
        event = None
    if data and (payload := "\n".join(data)) != "[DONE]":  # a last event without its blank line
        yield _decode(payload, event, provider, model)


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One piece of a streamed answer.

    ``tool_calls`` are this chunk's raw deltas (pieces of calls, with their ``index``); the
    complete calls are on the stream's result.
    """

    content: str
    provider: str
    model: str
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class _Call:
    """One tool call being assembled; its arguments are kept as pieces (joined once)."""

    __slots__ = ("arguments", "chars", "id", "name", "type")

    def __init__(self, call_id: str | None) -> None:
        self.id = call_id or ""
        self.type = "function"
        self.name = ""
        self.arguments: list[str] = []
        self.chars = 0

    def as_dict(self) -> dict[str, Any]:
        arguments = "".join(self.arguments)
        return {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.name, "arguments": arguments},
        }


class _ToolCalls:
    """Tool-call deltas folded into complete calls.

    OpenAI sends each call's ``id`` and name once, then its ``arguments`` in pieces, all
    under the call's ``index``; calls of a parallel answer may interleave. Some compatible
    servers send each call whole without ``index``: such a delta starts a new call when it
    has a new ``id`` or a name while the last call has one, else it continues the last call.
    Pieces are joined once, at the end: folding is linear in the arguments' length.
    """

    __slots__ = ("by_index", "calls")

    def __init__(self) -> None:
        self.calls: list[tuple[int, _Call]] = []  # (order, call), first seen first
        self.by_index: dict[int, _Call] = {}

    def fold(self, delta: Mapping[str, Any]) -> None:
        """Fold one delta in; raises ``ValueError`` for a field of the wrong type."""
        fn = delta.get("function")
        if fn is None:
            fn = _NO_DELTA
        elif type(fn) is not dict:
            raise ValueError("tool call function is not an object")
        name, arguments = fn.get("name"), fn.get("arguments")
        if (name is not None and type(name) is not str) or (
            arguments is not None and type(arguments) is not str
        ):
            raise ValueError("tool call name or arguments is not a string")
        call_id, kind = delta.get("id"), delta.get("type")
        call_id = call_id if type(call_id) is str else None
        index = delta.get("index")
        call: _Call | None
        if type(index) is int:
            call = self.by_index.get(index)
        else:
            index = None
            last = self.calls[-1][1] if self.calls else None
            new_id = call_id and last is not None and call_id != last.id
            call = None if last is None or new_id or (name and last.name) else last
        if call is None:
            call = _Call(call_id)
            self.calls.append((index if index is not None else len(self.calls), call))
            if index is not None:
                self.by_index[index] = call
        elif call_id and not call.id:
            call.id = call_id
        if kind and type(kind) is str:
            call.type = kind
        # A name sent again whole is not doubled; one sent in pieces is joined.
        if name and call.name != name:
            call.name += name
        if arguments:
            call.arguments.append(arguments)
            call.chars += len(arguments)

    def result(self) -> list[dict[str, Any]] | None:
        if not self.calls:
            return None
        return [call.as_dict() for _, call in sorted(self.calls, key=lambda entry: entry[0])]

    def chars(self) -> int:
        return sum(len(call.name) + call.chars for _, call in self.calls)


def content_chars(content: object) -> int:
    """Characters of a message ``content``: a string, or the text of its parts (not images)."""
    if type(content) is str:
        return len(content)
    if type(content) is list:
        return sum(
            len(text)
            for part in content
            if type(part) is dict and type(text := part.get("text")) is str
        )
    return 0


def _message_chars(message: Mapping[str, Any]) -> int:
    chars = content_chars(message.get("content"))
    calls = message.get("tool_calls")  # an assistant turn of the conversation's history
    if type(calls) is list:
        for call in calls:
            fn = call.get("function") if type(call) is dict else None
            if type(fn) is dict:
                chars += sum(
                    len(v) for v in (fn.get("name"), fn.get("arguments")) if type(v) is str
                )
    return chars


class StreamProgress:
    """What one streamed attempt has received so far: text, tool calls, usage."""

    __slots__ = (
        "cached_tokens",
        "calls",
        "chunks",
        "finish_reason",
        "input_tokens",
        "model",
        "output_tokens",
        "parts",
        "reasoning_tokens",
        "substantive",
    )

    def __init__(self, model: str) -> None:
        self.model = model
        self.parts: list[str] = []
        self.calls = _ToolCalls()
        self.chunks = 0
        # Whether anything but whitespace arrived: text or a tool call.
        self.substantive = False
        self.finish_reason: str | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.cached_tokens: int | None = None
        self.reasoning_tokens: int | None = None

    def apply(self, event: Mapping[str, Any], provider: str) -> StreamChunk | None:
        """Fold one event in; the chunk to give the caller, if it carries anything.

        Total over every JSON object: a ``choices[0]``, ``delta``, ``content`` or
        ``tool_calls`` of the wrong type raises :class:`MalformedResponseError`; wrong types
        in ``model``, ``finish_reason`` and usage counts are treated as not reported.
        """
        model = event.get("model")
        if model and type(model) is str:
            self.model = model
        usage = event.get("usage")
        if not usage:
            x_groq = event.get("x_groq")
            usage = x_groq.get("usage") if type(x_groq) is dict else None
        if usage and type(usage) is dict:
            # An explicit 0 stays 0; a missing (or unreadable) count keeps what we had.
            count = token_count(usage.get("prompt_tokens"))
            if count is not None:
                self.input_tokens = count
            count = token_count(usage.get("completion_tokens"))
            if count is not None:
                self.output_tokens = count
            self.cached_tokens = token_detail(usage, "prompt_tokens_details", "cached_tokens")
            self.reasoning_tokens = token_detail(
                usage, "completion_tokens_details", "reasoning_tokens"
            )
        choices = event.get("choices")
        if not choices:
            return None
        if type(choices) is not list or type(choice := choices[0]) is not dict:
            raise self._malformed("stream chunk choices of the wrong shape", provider)
        finish = choice.get("finish_reason")
        if type(finish) is not str:
            finish = None
        elif finish == "error":
            raise ServerError("stream finished with an error", provider=provider, model=self.model)
        delta = choice.get("delta")
        if delta is None:
            delta = _NO_DELTA
        elif type(delta) is not dict:
            raise self._malformed("stream chunk delta is not an object", provider)
        text = delta.get("content")
        if text is None:
            text = ""
        elif type(text) is not str:
            raise self._malformed("stream chunk content is not a string", provider)
        try:
            tools = tool_call_list(delta.get("tool_calls"))
        except ValueError as exc:
            raise self._malformed(f"stream chunk {exc}", provider) from None
        if finish:
            self.finish_reason = finish
        if not text and tools is None and not finish:
            return None
        if text:
            self.parts.append(text)
            if not self.substantive and not text.isspace():
                self.substantive = True
        if tools:
            try:
                for delta_call in tools:
                    self.calls.fold(delta_call)
            except ValueError as exc:
                raise self._malformed(f"stream chunk {exc}", provider) from None
            self.substantive = True
        self.chunks += 1
        return StreamChunk(text, provider, self.model, finish, tools)

    def _malformed(self, reason: str, provider: str) -> MalformedResponseError:
        return MalformedResponseError(reason, provider=provider, model=self.model)

    @property
    def content(self) -> str:
        return "".join(self.parts)

    def tool_calls(self) -> list[dict[str, Any]] | None:
        """The tool calls assembled from every delta so far (``None``: there were none)."""
        return self.calls.result()

    def tokens(self, messages: Sequence[Mapping[str, Any]]) -> tuple[int | None, int | None, bool]:
        """Input and output tokens: reported ones, else an estimate (flagged).

        The estimate is about 4 characters a token, of the messages' text (images are not
        text) and of what was produced: text and tool calls (names and arguments).
        """
        if self.input_tokens is not None and self.output_tokens is not None:
            return self.input_tokens, self.output_tokens, False
        inp = self.input_tokens
        if inp is None:
            inp = sum(_message_chars(m) for m in messages) // 4 + 1
        out = self.output_tokens
        if out is None:
            produced = sum(len(p) for p in self.parts) + self.calls.chars()
            out = produced // 4 + (1 if produced else 0)
        return inp, out, True
