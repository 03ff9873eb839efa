"""The answer of a non-streamed call: a 2xx body parsed into a :class:`ProviderResponse`.

Also what streams share with it: token counts, the tool-call list and the empty-answer rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import EmptyResponseError, MalformedResponseError

_loads = orjson.loads


@dataclass(frozen=True, slots=True)
class ProviderResponse:
    """A successful completion, normalised across providers."""

    content: str
    model: str
    finish_reason: str | None
    tool_calls: list[dict[str, Any]] | None
    input_tokens: int | None
    output_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None
    headers: Mapping[str, str]
    raw: dict[str, Any]


# Larger counts are nonsense, and their sum could overflow the bigint columns of the row.
_MAX_TOKENS = 2**40
_NO_USAGE: Mapping[str, Any] = {}


def token_count(value: object) -> int | None:
    """A reported token count, or ``None`` when it is missing or not a count.

    Providers and proxies sometimes send ``12.0`` or ``"12"``: integral floats and ASCII
    digit strings are coerced. Anything else (negative, bool, ``12.5``, ``"1e3"``, a list,
    above 2**40) is treated as *not reported*, never as a failed attempt: the answer itself
    is fine, only its count is unknown (the row gets NULL tokens and NULL cost).
    """
    if type(value) is int:  # the usual case; excludes bool
        return value if 0 <= value <= _MAX_TOKENS else None
    if type(value) is float:
        return int(value) if value.is_integer() and 0 <= value <= _MAX_TOKENS else None
    if type(value) is str and 0 < len(value) <= 13 and value.isascii() and value.isdigit():
        count = int(value)
        return count if count <= _MAX_TOKENS else None
    return None


def token_detail(usage: Mapping[str, Any], group: str, name: str) -> int | None:
    """A count from ``usage[group][name]`` (cached / reasoning tokens), if reported."""
    details = usage.get(group)
    return token_count(details.get(name)) if isinstance(details, dict) else None


def _malformed(reason: str, provider: str, model: str) -> MalformedResponseError:
    return MalformedResponseError(reason, provider=provider, model=model)


def tool_call_list(value: object) -> list[dict[str, Any]] | None:
    """``tool_calls`` as a list of objects, ``None`` when absent/empty; raises ``ValueError``
    for any other shape (the callers turn it into :class:`MalformedResponseError`)."""
    if not value:
        return None
    if type(value) is not list or not all(type(call) is dict for call in value):
        raise ValueError("tool_calls is not a list of objects")
    return value


def empty_answer(
    content: str,
    tool_calls: Sequence[Any] | None,
    output_tokens: int | None,
    params: Mapping[str, Any],
    provider: str,
    model: str,
) -> EmptyResponseError | None:
    """The error for an empty answer, or ``None``; one rule for completions and streams.

    Empty means all three: no content (empty or whitespace), no tool calls, and zero or
    unreported completion tokens. Tokens spent (a reasoning model stopped at ``length``)
    make an answer, however empty; so does anything a ``max_tokens: 0`` request gets.
    """
    if tool_calls or output_tokens or (content and not content.isspace()):
        return None
    for limit in ("max_tokens", "max_completion_tokens"):
        value = params.get(limit)
        if value == 0 and type(value) is not bool:
            return None
    return EmptyResponseError(
        "empty answer: no content, no tool calls, no completion tokens",
        provider=provider,
        model=model,
    )


def parse_completion(
    provider: str, requested_model: str, body: bytes, headers: Any
) -> ProviderResponse:
    """Turn a 2xx body into a :class:`ProviderResponse`, or raise MalformedResponseError.

    Total over every JSON value: the fields that carry the answer (``choices[0].message``,
    its ``content`` and ``tool_calls``) must have their documented types or the attempt is
    malformed (a ``null`` content is ``""``: whether the answer is empty is
    :func:`empty_answer`'s decision); wrong types in the others (``model``,
    ``finish_reason``, ``usage`` and its counts) are treated as not reported (see
    :func:`token_count`).
    """
    if not body:
        raise _malformed("empty response body", provider, requested_model)
    try:
        data = _loads(body)
    except ValueError:
        raise _malformed(
            f"response body is not JSON ({body[:40]!r})", provider, requested_model
        ) from None
    if type(data) is not dict:
        raise _malformed("response body is not a JSON object", provider, requested_model)
    choices = data.get("choices")
    if not choices or type(choices) is not list or type(choices[0]) is not dict:
        error = data.get("error")
        if error:
            reason = f"in-band error: {str(error)[:200]}"
        else:
            reason = "choices of the wrong shape" if choices else "no choices in response"
        raise _malformed(reason, provider, requested_model)
    choice = choices[0]
    message = choice.get("message")
    if type(message) is not dict:
        raise _malformed("choice has no message object", provider, requested_model)
    content = message.get("content")
    if content is not None and type(content) is not str:
        raise _malformed("message content is not a string", provider, requested_model)
    try:
        tool_calls = tool_call_list(message.get("tool_calls"))
    except ValueError as exc:
        raise _malformed(str(exc), provider, requested_model) from None
    usage = data.get("usage")
    if type(usage) is not dict:
        usage = _NO_USAGE
    model = data.get("model")
    finish = choice.get("finish_reason")
    return ProviderResponse(
        content=content or "",
        model=model if model and type(model) is str else requested_model,
        finish_reason=finish if type(finish) is str else None,
        tool_calls=tool_calls,
        input_tokens=token_count(usage.get("prompt_tokens")),
        output_tokens=token_count(usage.get("completion_tokens")),
        cached_tokens=token_detail(usage, "prompt_tokens_details", "cached_tokens"),
        reasoning_tokens=token_detail(usage, "completion_tokens_details", "reasoning_tokens"),
        headers=headers,
        raw=data,
    )
