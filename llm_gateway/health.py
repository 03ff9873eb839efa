"""Health of each provider key: latency and error averages, circuit breaker, rate-limit waits.

State is kept per (provider, key fingerprint), so one tenant's revoked or rate-limited key
never takes a provider away from the system key or from other tenants.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import AuthenticationError, ProviderError, RateLimitError

__all__ = ["HealthRegistry", "KeyHealth"]


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
            "state": "open"
            if self.open_until > now
            else ("half_open" if self.half_open else "closed"),
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
        self._state: dict[tuple[str, str], KeyHealth] = {}

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

    def on_success(
        self, state: KeyHealth, latency: float, headers: Mapping[str, str] | None = None
    ) -> None:
        a = self.alpha
        state.latency_ewma = (
            latency if state.latency_ewma is None else ((1 - a) * state.latency_ewma + a * latency)
        )
        state.error_ewma *= 1 - a
        state.consecutive_failures = 0
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
        if isinstance(error, AuthenticationError):
            state.open_until = now + self.auth_cooldown
            state.half_open = True
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

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [s.as_dict(now) for s in self._state.values()]
