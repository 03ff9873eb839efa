"""The one attempt loop, shared by completions and streams, hedging included.

:func:`run_attempts` walks a request's chain: it checks each key's breaker right before the
attempt, bounds the attempt by the deadline, turns every ending into health and one usage row
(success is the caller's part; the rows are the :class:`~.ledger.RequestLedger`'s), fails
over, and waits once for a key that only waits out a 429. What one attempt *does* is an
:class:`AttemptKind`: :class:`CompletionCall` here, the stream's opening in :mod:`.streaming`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from .chain import ChainEntry
from .config import HedgeConfig
from .errors import NoProviderAvailableError, ProviderError
from .health import HealthRegistry, KeyHealth
from .hedging import AttemptTimer, Outcome, attempt, race
from .ledger import RequestLedger
from .providers import Provider, ProviderResponse
from .types import CompletionResult

__all__ = ["AttemptKind", "AttemptTimer", "CompletionCall", "run_attempts"]


V = TypeVar("V")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class AttemptKind(Protocol[V, R_co]):
    """What one attempt does; :func:`run_attempts` owns everything around it.

    ``cap`` bounds one attempt (``None``: only the request's deadline); ``what`` names what
    the attempt waits for, in timeout messages.
    """

    @property
    def cap(self) -> float | None: ...

    @property
    def what(self) -> str: ...

    def begin(self, entry: ChainEntry) -> None:
        """Reset per-attempt state before trying ``entry``."""

    async def run(self, entry: ChainEntry, timeout: float) -> V:
        """The attempt; provider failures come out as :class:`ProviderError`."""

    def row(self, cancelled: bool) -> Mapping[str, Any]:
        """Extra ``RequestLedger.record`` arguments for an attempt that did not succeed."""

    async def release(self) -> None:
        """Free what a failed attempt holds (a stream's connection); after its row."""

    def succeed(self, entry: ChainEntry, state: KeyHealth, value: V, started: float) -> R_co:
        """Account a successful attempt (health, row) and make the request's result."""


async def run_attempts(
    kind: AttemptKind[V, R],
    chain: Sequence[ChainEntry],
    *,
    ledger: RequestLedger,
    health: HealthRegistry,
    deadline: float,
    budget: float,
    replan: Callable[[], Awaitable[list[ChainEntry]]],
    timer: AttemptTimer | None = None,
) -> R:
    """Try ``chain`` in order until an attempt succeeds; THE attempt loop of the router.

    Each entry's key is checked right before its attempt (another request may have opened
    its breaker or taken its half-open probe since the chain was planned); a skipped entry is
    not an attempt and writes no row. Only failures that came from a provider count against a
    key. When the last attempt was a 429, the chain is planned once more (``replan`` may wait
    out a Retry-After that fits the deadline).

    With a ``timer``, each attempt's cap comes from it (adaptive timeouts), and once per
    request an attempt that has not answered after ``timer.hedge_after`` is hedged: the next
    usable entry runs alongside it and the first good answer wins (see :func:`.hedging.race`).

    Raises:
        ProviderError: a final (non-retryable) failure, with ``.attempts``.
        InvalidRequestError: the request could not be sent (no row, no health change).
        AllProvidersFailedError, DeadlineExceededError: every attempt failed.
        NoProviderAvailableError: every entry was skipped, none was attempted.
    """
    deadline_hit = False
    retried = False
    hedged = False
    skipped: dict[str, str] | None = None
    failed: ProviderError | None = None  # the last retryable failure, until the next attempt
    while True:
        used = -1  # a hedge's entry of this pass: already attempted
        for i, entry in enumerate(chain):
            if i == used:
                continue
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                break
            state = health.get(entry.provider, entry.fingerprint)
            reason = health.blocked(state, now)
            if reason is not None:
                if skipped is None:
                    skipped = {}
                skipped[entry.provider] = reason
                continue
            if failed is not None:
                ledger.failover(failed, entry)
                failed = None
            health.on_attempt(state)
            more = i + 1 < len(chain)
            if timer is not None:
                cap = timer.attempt_cap(entry, state, remaining, more)
            else:
                cap = remaining if kind.cap is None else min(remaining, kind.cap)
            kind.begin(entry)
            after = None
            if timer is not None and not hedged and more:
                after = timer.hedge_after(entry)
            if timer is not None and after is not None and after < cap:
                outcomes, used = await race(
                    kind,
                    chain,
                    i,
                    Outcome(entry, state, 0.0, None, None),
                    cap,
                    remaining,
                    after,
                    timer=timer,
                    ledger=ledger,
                    health=health,
                    deadline=deadline,
                )
                hedged = used >= 0
            else:
                outcomes = [await attempt(kind, entry, state, cap, remaining, ledger, health)]
            won: Outcome[V] | None = None
            for o in outcomes:
                if o.error is None and o.value is not None:
                    if won is None:
                        won = o
                    else:  # both answered at once: the other answer is paid for too, its row
                        kind.succeed(o.entry, o.state, o.value, o.started)
            if won is not None and won.value is not None:
                return kind.succeed(won.entry, won.state, won.value, won.started)
            for outcome in outcomes:
                deadline_hit = deadline_hit or outcome.hit_deadline
                if outcome.error is not None:
                    if not outcome.error.retryable:
                        raise ledger.gave_up_logged(ledger.final(outcome.error))
                    failed = outcome.error
        # The last key answered 429: if a key frees up within the deadline, wait once.
        last = ledger.attempts[-1] if ledger.attempts else None
        if retried or last is None or last.outcome != "rate_limit":
            break
        retried = True
        try:
            chain = await replan()
        except NoProviderAvailableError:
            break
    if not ledger.attempts and skipped:
        raise NoProviderAvailableError(ledger.tenant_id, skipped)
    raise ledger.gave_up_logged(
        ledger.gave_up(deadline_hit or time.monotonic() >= deadline, budget)
    )


class CompletionCall:
    """A non-streamed attempt: one request, one response.

    It is also the loop's :class:`AttemptTimer`: ``cap`` (``attempt_timeout``) is a fixed cap
    when set, else the health registry's adaptive one; ``hedge`` says when to hedge.
    """

    __slots__ = (
        "cap",
        "health",
        "hedge",
        "ledger",
        "max_tokens",
        "messages",
        "params",
        "providers",
        "started",
    )

    what = "answer"

    def __init__(
        self,
        providers: Mapping[str, Provider],
        messages: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        *,
        ledger: RequestLedger,
        health: HealthRegistry,
        started: float,
        cap: float | None,
        hedge: HedgeConfig | None = None,
    ) -> None:
        self.providers = providers
        self.messages = messages
        self.params = params
        self.ledger = ledger
        self.health = health
        self.started = started
        self.cap = cap
        self.hedge = hedge
        limit = params.get("max_tokens", params.get("max_completion_tokens"))
        # A bool is an int to Python, not a token count.
        self.max_tokens = limit if type(limit) is int and limit > 0 else None

    def begin(self, entry: ChainEntry) -> None:
        pass

    def attempt_cap(
        self, entry: ChainEntry, state: KeyHealth, remaining: float, more: bool
    ) -> float:
        if self.cap is not None:
            return min(remaining, self.cap)
        return self.health.attempt_cap(state, entry.model, self.max_tokens, remaining, more)

    def hedge_after(self, entry: ChainEntry) -> float | None:
        hedge = self.hedge
        if hedge is None or not hedge.enabled:
            return None
        if hedge.after_ms is not None:
            return hedge.after_ms / 1000
        # A quantile of what this provider and model took; none yet: no basis to hedge.
        return self.health.latency_estimate(
            entry.provider, entry.model, hedge.quantile, self.max_tokens
        )

    async def run(self, entry: ChainEntry, timeout: float) -> ProviderResponse:
        provider, obs = self.providers[entry.provider], self.ledger.obs
        if obs is None:
            return await provider.complete(
                key=entry.key,
                model=entry.model,
                messages=self.messages,
                params=self.params,
                timeout=timeout,
            )
        return await provider.complete(
            key=entry.key,
            model=entry.model,
            messages=self.messages,
            params=self.params,
            timeout=timeout,
            extra_headers=obs.attempt_started(entry),
        )

    def row(self, cancelled: bool) -> Mapping[str, Any]:
        return _NO_FIELDS

    async def release(self) -> None:
        pass

    def succeed(
        self, entry: ChainEntry, state: KeyHealth, response: ProviderResponse, started: float
    ) -> CompletionResult:
        latency = time.monotonic() - started
        self.health.on_success(state, latency, response.headers)
        self.health.observe(entry.provider, entry.model, latency, response.output_tokens)
        extra = {"finish_reason": response.finish_reason} if response.finish_reason else None
        ledger = self.ledger
        _, cost = ledger.record(
            entry,
            "success",
            latency,
            model=response.model,
            input_tokens=response.input_tokens,
            output_tokens=response.output_tokens,
            cached_tokens=response.cached_tokens,
            reasoning_tokens=response.reasoning_tokens,
            extra=extra,
        )
        return CompletionResult(
            content=response.content,
            provider=entry.provider,
            model=response.model,
            tokens_input=response.input_tokens,
            tokens_output=response.output_tokens,
            cost=cost,
            latency=time.monotonic() - self.started,
            finish_reason=response.finish_reason,
            tool_calls=response.tool_calls,
            attempts=tuple(ledger.attempts),
            request_id=ledger.request_id,
            requested_model=entry.model,
            key_source=entry.key_source,
            raw=response.raw,
        )


_NO_FIELDS: Mapping[str, Any] = {}
