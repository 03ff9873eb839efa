"""The deterministic chat answer: ``chat.completion`` bodies and SSE chunk sequences."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .behaviour import DEFAULT_MODEL, MALFORMED_BODY, SSE_DONE, Behaviour, dumps, sse
from .structured import json_content, planned_calls

__all__ = ["Answer", "last_user_text", "prompt_chars", "split_text"]


def _text(content: Any) -> str:
    """Text of a message ``content`` (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return ""


def prompt_chars(body: Mapping[str, Any]) -> int:
    """Total characters of all message contents in a chat request."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(len(_text(m.get("content"))) for m in messages if isinstance(m, dict))


def last_user_text(body: Mapping[str, Any]) -> str:
    """Content of the last ``user`` message ("" when there is none)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                return _text(m.get("content"))
    return ""


def usage(
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int | None = None,
    reasoning_tokens: int | None = None,
) -> dict[str, Any]:
    """An OpenAI ``usage`` object, with the token details when given."""
    found: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        found["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if reasoning_tokens is not None:
        found["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return found


def split_text(text: str, pieces: int) -> list[str]:
    """Split ``text`` into at most ``pieces`` non-empty, nearly equal parts (in order)."""
    pieces = max(1, min(pieces, len(text)))
    if not text:
        return []
    size, extra = divmod(len(text), pieces)
    out: list[str] = []
    pos = 0
    for i in range(pieces):
        end = pos + size + (1 if i < extra else 0)
        out.append(text[pos:end])
        pos = end
    return out


@dataclass(slots=True)
class Answer:
    """Everything needed to render one chat answer, computed once per request."""

    cid: str
    created: int
    model: str
    content: str
    calls: list[tuple[str, str]]  # (function name, arguments JSON); [] answers with content
    usage: dict[str, Any]
    flavor: str

    @classmethod
    def for_request(
        cls,
        body: Mapping[str, Any],
        beh: Behaviour,
        *,
        name: str,
        model: str | None,
        flavor: str,
        seq: int,
        created: int,
    ) -> Answer:
        """Build the deterministic answer to chat request ``body``.

        Tools offered: tool calls (see :func:`.structured.planned_calls`); JSON mode: JSON
        content; ``empty_answer``: no content, no tool calls, zero completion tokens. The
        reported completion tokens count what was produced, tool calls included.
        """
        requested = body.get("model")
        model = model or (requested if isinstance(requested, str) else None) or DEFAULT_MODEL
        user = last_user_text(body)
        calls: list[tuple[str, str]] = []
        if beh.kind == "empty_answer":
            content = ""
        elif beh.content is not None:
            content = beh.content
        else:
            calls = planned_calls(body, user)
            text = f"[{name}] {user}"
            content = json_content(body, text) or text
        produced = sum(len(n) + len(a) for n, a in calls) if calls else len(content)
        prompt = beh.prompt_tokens if beh.prompt_tokens is not None else prompt_chars(body) // 4 + 1
        completion = beh.completion_tokens
        if beh.kind == "empty_answer":
            completion = 0
        elif completion is None:
            completion = produced // 4 + 1
        return cls(
            cid=f"chatcmpl-{name}-{seq}",
            created=created,
            model=model,
            content=content,
            calls=calls,
            usage=usage(prompt, completion, beh.cached_tokens, beh.reasoning_tokens),
            flavor=flavor,
        )

    @property
    def finish_reason(self) -> str:
        """``"tool_calls"`` when answering with a tool call, else ``"stop"``."""
        return "tool_calls" if self.calls else "stop"

    def _tool_call(self, i: int, arguments: str) -> dict[str, Any]:
        return {
            "id": f"call_{self.cid}_{i}",
            "type": "function",
            "function": {"name": self.calls[i][0], "arguments": arguments},
        }

    def completion(self, *, empty_choices: bool = False) -> bytes:
        """The ``chat.completion`` JSON body."""
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if not self.calls:
            message["content"] = self.content
        else:
            message["tool_calls"] = [self._tool_call(i, a) for i, (_, a) in enumerate(self.calls)]
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": self.finish_reason,
        }
        obj: dict[str, Any] = {
            "id": self.cid,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_sim",
            "choices": [] if empty_choices else [choice],
            "usage": self.usage,
        }
        if self.flavor == "groq":
            obj["x_groq"] = {"id": f"req_{self.cid}"}
        return dumps(obj)

    def _bare_chunk(self, **fields: Any) -> bytes:
        """A ``chat.completion.chunk`` event with the given extra fields (e.g. ``choices``)."""
        return sse(
            {
                "id": self.cid,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": "fp_sim",
                **fields,
            }
        )

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._bare_chunk(choices=[choice], **extra)

    def _deltas(self, pieces: int) -> list[bytes]:
        """The role chunk followed by the content (or tool call) chunks.

        Tool calls go one after the other, as OpenAI sends them: a chunk with the call's
        ``index``, ``id`` and name, then its arguments split over ``pieces`` chunks.
        """
        extra: dict[str, Any] = {}
        if self.flavor == "groq":
            extra["x_groq"] = {"id": f"req_{self.cid}"}
        if self.calls:
            out: list[bytes] = []
            for i, (_, arguments) in enumerate(self.calls):
                head = [{"index": i, **self._tool_call(i, "")}]
                if i == 0:
                    delta = {"role": "assistant", "content": None, "tool_calls": head}
                    out.append(self._chunk(delta, **extra))
                else:
                    out.append(self._chunk({"tool_calls": head}))
                out.extend(
                    self._chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
                    for piece in split_text(arguments, pieces)
                )
            return out
        out = [self._chunk({"role": "assistant", "content": ""}, **extra)]
        out.extend(self._chunk({"content": p}) for p in split_text(self.content, pieces))
        return out

    def stream(
        self,
        kind: str,
        beh: Behaviour,
        *,
        pieces: int,
        include_usage: bool,
    ) -> tuple[list[bytes], bool]:
        """SSE events for a streamed answer and whether to stall (not end) after them."""
        if kind == "stream_empty":
            return [SSE_DONE], False
        if kind == "stall_before_first":
            return [], True
        if kind == "raw":
            return [*(sse(e) for e in beh.events or ()), SSE_DONE], False
        deltas = self._deltas(pieces)
        if kind == "empty_choices":
            return [self._bare_chunk(choices=[]), SSE_DONE], False
        if kind == "stall_after_first":
            return deltas[:2], True
        if kind == "stream_malformed":
            return [*deltas[:2], b"data: " + MALFORMED_BODY + b"\n\n"], False
        if kind in ("stream_error_first", "stream_error_after_first", "groq_error_event"):
            before = beh.chunks_before_error
            if before is None:
                before = 1 if kind == "stream_error_after_first" else 0
            events = deltas[: before + 1] if before > 0 else []
            message = beh.message or "Upstream provider error: stream interrupted"
            if kind == "groq_error_event":
                err: dict[str, Any] = {"message": message, "type": "internal_server_error"}
                events.append(sse({"error": err}, event="error"))
            else:
                err = {"message": message, "code": 502}
                choice = {"index": 0, "delta": {"content": ""}, "finish_reason": "error"}
                events.append(self._bare_chunk(error=err, choices=[choice]))
            return events, False
        # "ok"
        if self.flavor == "groq":
            x_groq = {"id": f"req_{self.cid}", "usage": self.usage}
            deltas.append(self._chunk({}, self.finish_reason, x_groq=x_groq))
        else:
            deltas.append(self._chunk({}, self.finish_reason))
            if include_usage:
                deltas.append(self._bare_chunk(choices=[], usage=self.usage))
        deltas.append(SSE_DONE)
        return deltas, False
