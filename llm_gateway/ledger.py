"""The ledger of one request: every finished attempt becomes a usage row, a cost and an observation.

:class:`RequestLedger` queues one row per finished attempt (``tracker.record()``, no I/O), tells
governance each row's cost and the request's observer (metrics, tracing) each attempt's end, and
makes the errors that end a request. The attempt loop that feeds it is :mod:`.attempts`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from usage import ModelUsageTracker, new_usage_id
from usage.pricing import PriceBook

from .chain import ChainEntry
from .errors import AllProvidersFailedError, DeadlineExceededError, ProviderError
from .types import Attempt, TaskType

if TYPE_CHECKING:
    from .observability import RequestObservation

__all__ = ["RequestLedger"]

log = logging.getLogger("llm_gateway")

E = TypeVar("E", bound=BaseException)


class RequestLedger:
    """The attempts of one request, each queued as a usage row as soon as it ends.

    Queueing is ``tracker.record()``: synchronous, no I/O. Rows of one request share
    ``request_id`` and are numbered by ``attempt``.
    """

    __slots__ = (
        "attempts",
        "endpoint",
        "hedged",
        "metadata",
        "obs",
        "on_cost",
        "prices",
        "request_id",
        "session_id",
        "tags",
        "task_type",
        "tenant_id",
        "tracker",
        "user_id",
        "virtual_key_id",
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
        *,
        session_id: str | None = None,
        tags: list[str] | None = None,
        virtual_key_id: str | None = None,
    ) -> None:
        self.tenant_id = tenant_id
        self.virtual_key_id = virtual_key_id  # its rows carry it (a per-key quota)
        self.session_id = session_id  # validated by the router
        self.tags = tags
        self.tracker = tracker
        self.prices = prices
        self.endpoint = endpoint
        self.user_id = user_id
        self.task_type = task_type
        # Copied once: the rows are serialised later, after the caller may have changed it.
        self.metadata = dict(metadata) if metadata else None
        self.request_id = new_usage_id()
        self.attempts: list[Attempt] = []
        # The entries of a hedged race: their rows carry ``metadata.hedge``.
        self.hedged: tuple[ChainEntry, ...] = ()
        # Governance: told each row's cost (usage id, cost, made with a system key).
        self.on_cost: Callable[[uuid.UUID, Decimal | None, bool], None] | None = None
        # Metrics and tracing of this request (None: both off).
        self.obs: RequestObservation | None = None

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
        message: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[Attempt, Decimal | None]:
        """Queue the usage row of one finished attempt; returns it as an Attempt and its cost.

        The row's ``metadata`` holds the SDK's fields (``task_type``, ``key_fp``, ``stream``,
        ...) at the top level and the caller's ``metadata`` under ``"caller"``, so a caller's
        key never overwrites the SDK's.
        """
        served = model or entry.model
        usage_id = new_usage_id()
        if message is None and error is not None:
            message = str(error) or type(error).__name__
        cost: Decimal | None
        if self.tracker is not None:
            meta: dict[str, Any] = {"task_type": self.task_type.value, "key_fp": entry.fingerprint}
            if extra:
                meta.update(extra)
            if self.hedged and any(e is entry for e in self.hedged):
                meta["hedge"] = True
            if self.metadata:
                meta["caller"] = self.metadata
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
                session_id=self.session_id,
                tags=self.tags,
                virtual_key_id=self.virtual_key_id,
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
        if self.on_cost is not None and cost:
            self.on_cost(usage_id, cost, entry.key_source == "system")
        if self.obs is not None:
            self.obs.attempt_ended(
                entry, outcome, latency, served, input_tokens, output_tokens, cost, error
            )
        if error is not None:
            # DEBUG: the failover (or the request's failure) that follows is the INFO line.
            log.debug(
                "attempt failed: tenant=%s provider=%s model=%s key=%s outcome=%s error=%s",
                self.tenant_id,
                entry.provider,
                served,
                entry.fingerprint,
                outcome,
                type(error).__name__,
                extra=self.log_fields(entry.provider, len(self.attempts) + 1, outcome),
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
            retry_after=getattr(error, "retry_after", None),
        )
        self.attempts.append(attempt)
        return attempt, cost

    def log_fields(self, provider: str, attempt: int, outcome: str) -> dict[str, Any]:
        """The structured ``extra`` of this request's log records (no key, no content)."""
        return {
            "request_id": str(self.request_id),
            "tenant": str(self.tenant_id),
            "provider": provider,
            "attempt": attempt,
            "outcome": outcome,
        }

    def failover(self, failed: ProviderError, to: ChainEntry) -> None:
        """The attempt loop moves on after ``failed``: one INFO line, and the observer."""
        number = len(self.attempts)
        log.info(
            "failover: tenant=%s provider=%s failed (%s), next %s",
            self.tenant_id,
            failed.provider,
            failed.status,
            to.provider,
            extra={**self.log_fields(failed.provider, number, failed.status), "next": to.provider},
        )
        if self.obs is not None:
            self.obs.failover(failed.provider, failed.status)

    def gave_up_logged(self, error: E) -> E:
        """``error`` (the request's end), logged once at INFO."""
        last = self.attempts[-1] if self.attempts else None
        log.info(
            "request failed: tenant=%s attempts=%d error=%s",
            self.tenant_id,
            len(self.attempts),
            type(error).__name__,
            extra=self.log_fields(
                last.provider if last else "", len(self.attempts), last.outcome if last else ""
            ),
        )
        return error

    def failed(
        self,
        entry: ChainEntry,
        error: ProviderError,
        latency: float,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Record a failed attempt (the caller raises it if it is final)."""
        self.record(entry, error.status, latency, error=error, extra=extra)

    def final(self, error: ProviderError) -> ProviderError:
        """``error`` carrying every attempt, to be raised: another provider would fail alike."""
        error.attempts = tuple(self.attempts)
        return error

    def gave_up(self, deadline_passed: bool, budget: float) -> AllProvidersFailedError:
        """The error ending a request whose every attempt failed."""
        if deadline_passed:
            return DeadlineExceededError(self.tenant_id, self.attempts, budget)
        return AllProvidersFailedError(self.tenant_id, self.attempts)
