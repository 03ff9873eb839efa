"""One attempt of the attempt loop, and the hedged race of two.

:func:`attempt` runs one attempt bounded by its cap and accounts every ending but success
(health, usage row, release). :func:`race` runs one attempt and, if it has not answered after
a delay, the next usable entry of the chain alongside it: the first good answer wins, the
other attempt is cancelled and writes its own ``cancelled`` row (``metadata.hedge``). Only
non-streamed completions are hedged (:class:`~.attempts.CompletionCall` is the only
:class:`AttemptTimer`); a stream's opening is bounded by ``ttft_timeout`` instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from .chain import ChainEntry
from .errors import InvalidRequestError, ProviderError, ProviderTimeoutError
from .health import HealthRegistry, KeyHealth

if TYPE_CHECKING:  # attempts imports this module at run time
    from .attempts import AttemptKind
    from .ledger import RequestLedger

__all__ = ["AttemptTimer", "Outcome", "attempt", "race"]

V = TypeVar("V")
R = TypeVar("R")


class AttemptTimer(Protocol):
    """Per-entry limits of a kind that has them (non-streamed completions).

    ``attempt_cap``: seconds one attempt on ``entry`` may take, given what is ``remaining``
    of the deadline and whether ``more`` entries follow. ``hedge_after``: seconds after which
    the next provider is started as well, or ``None`` (no hedge).
    """

    def attempt_cap(
        self, entry: ChainEntry, state: KeyHealth, remaining: float, more: bool
    ) -> float: ...

    def hedge_after(self, entry: ChainEntry) -> float | None: ...


class Outcome(Generic[V]):
    """How one attempt ended: ``value`` when it succeeded, else ``error`` (row already queued)."""

    __slots__ = ("entry", "error", "hit_deadline", "started", "state", "value")

    def __init__(
        self,
        entry: ChainEntry,
        state: KeyHealth,
        started: float,
        value: V | None,
        error: ProviderError | None,
        hit_deadline: bool = False,
    ) -> None:
        self.entry = entry
        self.state = state
        self.started = started
        self.value = value
        self.error = error
        self.hit_deadline = hit_deadline


async def attempt(
    kind: AttemptKind[V, R],
    entry: ChainEntry,
    state: KeyHealth,
    cap: float,
    remaining: float,
    ledger: RequestLedger,
    health: HealthRegistry,
) -> Outcome[V]:
    """One attempt bounded by ``cap``; every ending but success is accounted here."""
    t0 = time.monotonic()
    error: ProviderError
    hit = False
    try:
        async with asyncio.timeout(cap):
            value = await kind.run(entry, cap)
    except ProviderError as exc:
        error = exc
    except TimeoutError:
        error = ProviderTimeoutError(
            f"no {kind.what} within {cap:.3g}s", provider=entry.provider, model=entry.model
        )
        hit = cap >= remaining
    except InvalidRequestError:
        # Never sent: says nothing about the key, but frees a half-open probe.
        health.on_cancel(state)
        await kind.release()
        raise
    except asyncio.CancelledError as cancelled:
        # The row first: a second cancellation during release() must not lose it.
        health.on_cancel(state)
        ledger.record(entry, "cancelled", time.monotonic() - t0, error=cancelled, **kind.row(True))
        await kind.release()
        raise
    except Exception as bug:
        # A defect of ours, not the provider's: row and probe, then let it surface.
        health.on_cancel(state)
        ledger.record(
            entry,
            "error",
            time.monotonic() - t0,
            error=bug,
            message=f"unexpected {type(bug).__name__}",
            **kind.row(True),
        )
        await kind.release()
        raise
    else:
        return Outcome(entry, state, t0, value, None)
    health.on_failure(state, error)
    ledger.failed(entry, error, time.monotonic() - t0, **kind.row(False))
    await kind.release()
    return Outcome(entry, state, t0, None, error, hit)


_HEDGE_LOST = "hedge: another attempt answered first"


async def race(
    kind: AttemptKind[V, R],
    chain: Sequence[ChainEntry],
    index: int,
    first: Outcome[V],
    cap: float,
    remaining: float,
    after: float,
    *,
    timer: AttemptTimer,
    ledger: RequestLedger,
    health: HealthRegistry,
    deadline: float,
) -> tuple[list[Outcome[V]], int]:
    """The attempt ``first`` describes (``chain[index]``, not started yet), hedged after
    ``after`` seconds by the next usable entry of ``chain``; returns the outcomes in the
    order they ended and the index of the hedge's entry (-1: none was started).

    The first success wins at once: the other attempt is cancelled (row ``cancelled``), and
    both rows carry ``metadata.hedge``. A final failure also ends the race; a retryable one
    waits for the other attempt.
    """
    tasks = [
        asyncio.create_task(attempt(kind, first.entry, first.state, cap, remaining, ledger, health))
    ]
    hedge_index = -1
    ended: list[Outcome[V]] = []
    reason: str | None = _HEDGE_LOST
    try:
        done, _ = await asyncio.wait(tasks, timeout=after)
        if not done:
            now = time.monotonic()
            for j in range(index + 1, len(chain)):
                entry = chain[j]
                state = health.get(entry.provider, entry.fingerprint)
                if health.blocked(state, now) is not None:
                    continue
                hedge_index = j
                ledger.hedged = (first.entry, entry)
                health.on_attempt(state)
                left = deadline - now
                hcap = timer.attempt_cap(entry, state, left, j + 1 < len(chain))
                kind.begin(entry)
                tasks.append(
                    asyncio.create_task(attempt(kind, entry, state, hcap, left, ledger, health))
                )
                break
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            # In chain order, for a tie; all of them: an answer that came too needs its row.
            ended.extend(task.result() for task in tasks if task in done)
            if any(o.error is None or not o.error.retryable for o in ended):
                return ended, hedge_index
        return ended, hedge_index
    except asyncio.CancelledError:
        reason = None  # the caller's cancellation, recorded like any other
        raise
    finally:
        # Losers (and both, if the caller was cancelled) write their own cancelled rows.
        for task in tasks:
            if not task.done():
                task.cancel(reason)
        await asyncio.gather(*tasks, return_exceptions=True)
