"""Turns each attempt of a request into one usage row and one :class:`Attempt`."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from usage import ModelUsageTracker, new_usage_id
from usage.pricing import PriceBook

from .chain import ChainEntry
from .errors import AllProvidersFailedError, DeadlineExceededError, ProviderError
from .types import Attempt, TaskType

__all__ = ["RequestLedger"]

log = logging.getLogger("llm_gateway")


class RequestLedger:
    """The attempts of one request, each queued as a usage row as soon as it ends.

    Queueing is ``tracker.record()``: synchronous, no I/O. Rows of one request share
    ``request_id`` and are numbered by ``attempt``.
    """

    __slots__ = (
        "attempts",
        "endpoint",
        "metadata",
        "prices",
        "request_id",
        "task_type",
        "tenant_id",
        "tracker",
        "user_id",
    )

    def __init__(
        self,
        tenant_id: uuid.UUID,
        tracker: ModelUsageTracker | None,
        prices: PriceBook,
        endpoint: str,
        user_id: str | None,
        task_type: TaskType,
        metadata: Mapping[str, Any] | None,
    ) -> None:
        self.tenant_id = tenant_id
        self.tracker = tracker
        self.prices = prices
        self.endpoint = endpoint
        self.user_id = user_id
        self.task_type = task_type
        self.metadata = metadata
        self.request_id = new_usage_id()
        self.attempts: list[Attempt] = []

    def record(
        self,
        entry: ChainEntry,
        outcome: str,
        latency: float,
        *,
        model: str | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        cached_tokens: int | None = None,
        reasoning_tokens: int | None = None,
        error: ProviderError | BaseException | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[Attempt, Decimal | None]:
        """Queue the usage row of one finished attempt; returns it as an Attempt and its cost."""
        served = model or entry.model
        usage_id = new_usage_id()
        message = None if error is None else (str(error) or type(error).__name__)
        cost: Decimal | None
        if self.tracker is not None:
            meta: dict[str, Any] = {"task_type": self.task_type.value, "key_fp": entry.fingerprint}
            if extra:
                meta.update(extra)
            if self.metadata:
                meta.update(self.metadata)
            # The tracker prices the row; the caller's result carries the same cost.
            row = self.tracker.make_record(
                tenant_id=self.tenant_id,
                provider=entry.provider,
                model_name=served,
                endpoint=self.endpoint,
                latency_ms=latency * 1000,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cached_input_tokens=cached_tokens,
                reasoning_tokens=reasoning_tokens,
                status=outcome,
                error_message=message,
                user_id=self.user_id,
                metadata=meta,
                request_id=self.request_id,
                requested_model=entry.model,
                attempt=len(self.attempts) + 1,
                key_source=entry.key_source,
                usage_id=usage_id,
            )
            self.tracker.record(row)
            cost = row.estimated_cost_usd
        else:
            price = self.prices.lookup(entry.provider, served, requested=entry.model)
            cost = (
                None
                if price is None
                else price.cost(
                    input_tokens,
                    output_tokens,
                    cached_input_tokens=cached_tokens,
                    reasoning_tokens=reasoning_tokens,
                )
            )
        if error is not None:
            log.info(
                "attempt failed: tenant=%s provider=%s model=%s key=%s outcome=%s error=%s",
                self.tenant_id,
                entry.provider,
                served,
                entry.fingerprint,
                outcome,
                type(error).__name__,
            )
        attempt = Attempt(
            provider=entry.provider,
            model=served,
            key_source=entry.key_source,
            outcome=outcome,
            latency=latency,
            usage_id=usage_id,
            error_class=None if error is None else type(error).__name__,
            error_message=message,
            status_code=getattr(error, "status_code", None),
        )
        self.attempts.append(attempt)
        return attempt, cost

    def failed(
        self,
        entry: ChainEntry,
        error: ProviderError,
        latency: float,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Record a failed attempt; re-raise it when another provider would fail the same way."""
        self.record(entry, error.status, latency, error=error, extra=extra)
        if not error.retryable:
            error.attempts = tuple(self.attempts)
            raise error

    def gave_up(self, deadline_passed: bool, budget: float) -> AllProvidersFailedError:
        """The error ending a request whose every attempt failed."""
        if deadline_passed:
            return DeadlineExceededError(self.tenant_id, self.attempts, budget)
        return AllProvidersFailedError(self.tenant_id, self.attempts)
