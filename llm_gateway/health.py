"""Health of each provider key: latency and error averages, circuit breaker, rate-limit waits.

State is kept per (provider, key fingerprint), so one tenant's revoked or rate-limited key
never takes a provider away from the system key or from other tenants. Latencies of
successful non-streamed answers are kept per (provider, model) in a :class:`LatencySketch`,
from which :class:`AdaptiveTimeouts` derives each attempt's cap and hedging its delay.
"""

from __future__ import annotations

import logging
import math
import time
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import AuthenticationError, ProviderError, RateLimitError

__all__ = ["AdaptiveTimeouts", "HealthRegistry", "KeyHealth", "LatencySketch"]

log = logging.getLogger("llm_gateway.health")


def _state(state: KeyHealth, now: float) -> str:
    if state.open_until > now:
        return "open"
    return "half_open" if state.half_open else "closed"


def _transition(state: KeyHealth, before: str, after: str) -> None:
    """One INFO line per breaker transition (fingerprints only, never keys)."""
    log.info(
        "breaker %s -> %s: provider=%s key=%s last_error=%s",
        before,
        after,
        state.provider,
        state.fingerprint,
        state.last_error,
        extra={
            "provider": state.provider,
            "key_fp": state.fingerprint,
            "breaker_from": before,
            "breaker_state": after,
            "outcome": state.last_error,
        },
    )


@dataclass(slots=True)
class KeyHealth:
    """What the router knows about one provider key. Times are ``time.monotonic()`` seconds."""

    provider: str
    fingerprint: str
    latency_ewma: float | None = None  # seconds, successful attempts only
    error_ewma: float = 0.0  # 0..1, share of recent attempts that failed retryably
    consecutive_failures: int = 0
    open_until: float = 0.0  # breaker open: no attempts before this
    half_open: bool = False  # one probe allowed after the breaker's cooldown
    probe_in_flight: bool = False
    skip_until: float = 0.0  # a 429's Retry-After
    last_error: str | None = None
    requests: int = 0
    failures: int = 0
    ratelimit_remaining_requests: int | None = None

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "key_fingerprint": self.fingerprint,
            "state": _state(self, now),
            "open_for_s": round(max(0.0, self.open_until - now), 3),
            "rate_limited_for_s": round(max(0.0, self.skip_until - now), 3),
            "latency_ewma_ms": None
            if self.latency_ewma is None
            else round(self.latency_ewma * 1000, 1),
            "error_rate": round(self.error_ewma, 3),
            "consecutive_failures": self.consecutive_failures,
            "requests": self.requests,
            "failures": self.failures,
            "ratelimit_remaining_requests": self.ratelimit_remaining_requests,
            "last_error": self.last_error,
        }


class LatencySketch:
    """Recent successful latencies of one (provider, model): a fixed ring, no allocation per sample.

    Each sample is kept twice: the whole latency, and the latency per output token (the
    latency divided by the answer's output tokens, at least 1). The per-token figure includes
    the provider's fixed overhead, so it overstates the time of a long answer: scaling it by a
    request's ``max_tokens`` errs on the side of a longer cap. Quantiles are read from sorted
    copies made lazily, once per batch of new samples (1/16 of those held), not per request.
    """

    __slots__ = ("_fresh", "_latency", "_next", "_per_token", "_sorted", "count", "size")

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self.count = 0  # samples held (at most size)
        self._next = 0
        self._latency = array("d", bytes(8 * size))
        self._per_token = array("d", bytes(8 * size))
        self._sorted: tuple[list[float], list[float]] | None = None
        self._fresh = 0  # samples added since the sorted copies were made

    def add(self, latency: float, output_tokens: int | None) -> None:
        """Record one successful answer: its latency (seconds) and output tokens, if known."""
        i = self._next
        self._latency[i] = latency
        self._per_token[i] = latency / max(output_tokens or 1, 1)
        self._next = (i + 1) % self.size
        if self.count < self.size:
            self.count += 1
        self._fresh += 1

    def estimate(self, q: float, max_tokens: int | None = None) -> float | None:
        """The ``q``-quantile latency of a request asking for ``max_tokens`` (``None``: none held).

        Without ``max_tokens`` it is the quantile of recent latencies; with it, the larger of
        that and the per-token quantile times ``max_tokens`` (a long answer takes longer).
        """
        n = self.count
        if n == 0:
            return None
        if self._sorted is None or self._fresh > n // 16:
            self._sorted = (sorted(self._latency[:n]), sorted(self._per_token[:n]))
            self._fresh = 0
        whole, per_token = self._sorted
        held = len(whole)  # the copies may predate the latest few samples
        rank = min(held - 1, max(0, math.ceil(q * held) - 1))  # nearest rank
        if max_tokens is None or max_tokens <= 0:
            return whole[rank]
        return max(whole[rank], per_token[rank] * max_tokens)


@dataclass(frozen=True, slots=True)
class AdaptiveTimeouts:
    """How long one non-streamed attempt may take when ``attempt_timeout`` is not set.

    Warm (at least ``min_samples`` successful answers of this provider and model in the
    last ``window``): ``factor`` times the ``quantile`` latency, scaled by the request's
    ``max_tokens`` (:meth:`LatencySketch.estimate`). Cold: ``cold`` seconds plus
    ``cold_per_token`` per requested ``max_tokens``. Either way within [``floor``,
    ``ceiling``]; and when another provider follows in the chain, the attempt leaves
    ``reserve`` (a share) of the remaining deadline for it. A half-open breaker's probe gets
    at least the cold cap, so a provider that became slower than its history can prove
    itself again rather than be cut forever.
    """

    quantile: float = 0.99
    factor: float = 4.0
    floor: float = 3.0
    ceiling: float = 120.0
    min_samples: int = 20
    window: int = 128
    cold: float = 10.0
    cold_per_token: float = 0.02
    reserve: float = 0.25

    def cold_cap(self, max_tokens: int | None) -> float:
        extra = self.cold_per_token * max_tokens if max_tokens and max_tokens > 0 else 0.0
        return min(self.ceiling, max(self.floor, self.cold + extra))


class HealthRegistry:
    """Per-key health, updated after each attempt and read when the chain is ordered.

    The breaker opens after ``failure_threshold`` consecutive retryable failures, or when the
    recent error rate (an EWMA over roughly the last ``1/alpha`` attempts) reaches
    ``error_rate_threshold`` after ``min_requests`` attempts; at once for a 401/403, for
    ``auth_cooldown``. It stays open ``cooldown`` seconds, then lets one probe through; the
    probe's success closes it, its failure opens it again.

    A 429 skips its key for the response's ``Retry-After`` (``default_retry_after`` when it
    has none), at most ``max_retry_after`` seconds (default 300): a provider (or a proxy) that
    answers ``Retry-After: 1e9`` must not disable a key until the process restarts.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        cooldown: float = 30.0,
        auth_cooldown: float = 300.0,
        default_retry_after: float = 1.0,
        max_retry_after: float = 300.0,
        error_rate_threshold: float = 0.5,
        min_requests: int = 20,
        alpha: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        timeouts: AdaptiveTimeouts | None = AdaptiveTimeouts(),  # frozen: safe to share
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.auth_cooldown = auth_cooldown
        self.default_retry_after = default_retry_after
        self.max_retry_after = max_retry_after
        self.error_rate_threshold = error_rate_threshold
        self.min_requests = min_requests
        self.alpha = alpha
        self.clock = clock
        self.timeouts = timeouts
        self._state: dict[tuple[str, str], KeyHealth] = {}
        self._latency: dict[tuple[str, str], LatencySketch] = {}

    def get(self, provider: str, fingerprint: str) -> KeyHealth:
        key = (provider, fingerprint)
        state = self._state.get(key)
        if state is None:
            state = self._state[key] = KeyHealth(provider, fingerprint)
        return state

    def peek(self, provider: str, fingerprint: str) -> KeyHealth | None:
        return self._state.get((provider, fingerprint))

    def rate_limit_wait(self, provider: str, fingerprint: str, now: float) -> float | None:
        """Seconds until a key that is only waiting out a 429 may be used, else ``None``."""
        state = self._state.get((provider, fingerprint))
        if state is None or state.skip_until <= now or state.open_until > now:
            return None
        return state.skip_until - now

    def blocked(self, state: KeyHealth | None, now: float) -> str | None:
        """Why no attempt should be made with this key now, or ``None``."""
        if state is None:
            return None
        if state.skip_until > now:
            return f"rate limited for {state.skip_until - now:.1f}s"
        if state.open_until > now:
            return f"circuit open for {state.open_until - now:.1f}s ({state.last_error})"
        if state.half_open and state.probe_in_flight:
            return "circuit half-open, probe in flight"
        return None

    def on_attempt(self, state: KeyHealth) -> None:
        state.requests += 1
        if state.half_open:
            state.probe_in_flight = True
            _transition(state, "open", "half_open")

    def on_success(
        self, state: KeyHealth, latency: float, headers: Mapping[str, str] | None = None
    ) -> None:
        a = self.alpha
        state.latency_ewma = (
            latency if state.latency_ewma is None else ((1 - a) * state.latency_ewma + a * latency)
        )
        state.error_ewma *= 1 - a
        state.consecutive_failures = 0
        if state.half_open:
            _transition(state, _state(state, self.clock()), "closed")
        state.half_open = state.probe_in_flight = False
        state.open_until = 0.0
        if headers is not None:
            remaining = headers.get("x-ratelimit-remaining-requests")
            if remaining is not None and remaining.isdigit():
                state.ratelimit_remaining_requests = int(remaining)

    def on_cancel(self, state: KeyHealth) -> None:
        """The caller gave up: says nothing about the key, but frees a half-open probe."""
        state.probe_in_flight = False

    def on_failure(self, state: KeyHealth, error: ProviderError) -> None:
        if not error.retryable:
            # The request was at fault, not the provider.
            state.probe_in_flight = False
            return
        now = self.clock()
        a = self.alpha
        state.failures += 1
        state.error_ewma = (1 - a) * state.error_ewma + a
        state.consecutive_failures += 1
        state.last_error = type(error).__name__
        state.probe_in_flight = False
        if isinstance(error, RateLimitError):
            wait = error.retry_after
            if wait is None or wait != wait:  # none given, or NaN
                wait = self.default_retry_after
            # The wait comes from the provider: never negative, never longer than the cap.
            wait = min(max(wait, 0.0), self.max_retry_after)
            state.skip_until = max(state.skip_until, now + wait)
            state.ratelimit_remaining_requests = 0
            return
        before = _state(state, now)
        if isinstance(error, AuthenticationError):
            state.open_until = now + self.auth_cooldown
            state.half_open = True
            if before != "open":
                _transition(state, before, "open")
        elif (
            state.half_open
            or state.consecutive_failures >= self.failure_threshold
            or (
                state.requests >= self.min_requests
                and state.error_ewma >= self.error_rate_threshold
            )
        ):
            state.open_until = now + self.cooldown
            state.half_open = True
            if before != "open":
                _transition(state, before, "open")

    # --- latency: adaptive attempt caps and hedging delays ---------------------------------

    def observe(self, provider: str, model: str, latency: float, output_tokens: int | None) -> None:
        """Add a successful non-streamed answer to its (provider, model) latency sketch."""
        key = (provider, model)
        sketch = self._latency.get(key)
        if sketch is None:
            window = self.timeouts.window if self.timeouts is not None else 128
            sketch = self._latency[key] = LatencySketch(window)
        sketch.add(latency, output_tokens)

    def latency_estimate(
        self, provider: str, model: str, q: float, max_tokens: int | None = None
    ) -> float | None:
        """The ``q``-quantile latency of (provider, model), or ``None`` before ``min_samples``."""
        sketch = self._latency.get((provider, model))
        needed = self.timeouts.min_samples if self.timeouts is not None else 20
        if sketch is None or sketch.count < needed:
            return None
        return sketch.estimate(q, max_tokens)

    def attempt_cap(
        self,
        state: KeyHealth,
        model: str,
        max_tokens: int | None,
        remaining: float,
        more: bool,
    ) -> float:
        """Seconds one non-streamed attempt on ``state``'s key may take (:class:`AdaptiveTimeouts`).

        ``remaining`` is what is left of the request's deadline; ``more``: another provider
        follows in the chain, so part of ``remaining`` is kept for it.
        """
        policy = self.timeouts
        if policy is None:
            return remaining
        estimate = self.latency_estimate(state.provider, model, policy.quantile, max_tokens)
        if estimate is None:
            cap = policy.cold_cap(max_tokens)
        else:
            cap = min(policy.ceiling, max(policy.floor, policy.factor * estimate))
            if state.half_open:
                cap = max(cap, policy.cold_cap(max_tokens))
        if more:
            return min(cap, remaining * (1.0 - policy.reserve))
        return min(cap, remaining)

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [s.as_dict(now) for s in self._state.values()]
