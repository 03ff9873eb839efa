"""Value types of the public API: task types, attempts and completion results."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any


class TaskType(enum.StrEnum):
    """What a request is for. Recorded with each usage row; later issues route on it."""

    CHAT = "chat"
    CODE = "code"
    REASONING = "reasoning"
    SUMMARIZATION = "summarization"
    EXTRACTION = "extraction"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try of a request against one provider."""

    provider: str
    model: str
    key_source: str
    # The usage row's status: success, error, rate_limit, timeout, auth_error, empty_response, ...
    outcome: str
    latency: float  # seconds
    usage_id: uuid.UUID
    error_class: str | None = None
    error_message: str | None = None
    status_code: int | None = None
    retry_after: float | None = None  # seconds the provider advised on a 429


@dataclass(frozen=True, slots=True)
class CompletionResult:
    """The answer to ``complete_for_tenant``.

    ``cost`` is ``None`` when the served model has no known price. ``latency`` is the whole
    request in seconds, failed attempts included. ``tool_calls`` are complete calls in
    OpenAI's shape (``id``, ``type``, ``function.name``, ``function.arguments`` as a JSON
    string), assembled from the deltas for a stream; ``None`` when the answer has none.
    ``content`` is ``""`` when the answer is only tool calls.
    """

    content: str
    provider: str
    model: str
    tokens_input: int | None
    tokens_output: int | None
    cost: Decimal | None
    latency: float
    finish_reason: str | None
    tool_calls: list[dict[str, Any]] | None
    attempts: tuple[Attempt, ...]
    request_id: uuid.UUID
    requested_model: str
    key_source: str
    raw: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def usage_id(self) -> uuid.UUID:
        """Id of the ``model_usage_stats`` row of the successful attempt."""
        return self.attempts[-1].usage_id
