"""The full admission path, when the cached one cannot admit: which limits are short, what
steering quotas remove from the chain, how a spent budget falls back, and the refusal."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol

from .alerts import AlertSink, check_alerts
from .errors import BudgetExceededError, QuotaExceededError
from .leases import LeaseBook
from .limits import LimitSpec
from .plan import QuotaPlan

__all__ = ["Allowed", "Entry", "Short", "refusal", "shortage", "steering", "worst"]


class Entry(Protocol):
    """What admission reads of a chain entry (``chain.ChainEntry`` has it)."""

    @property
    def provider(self) -> str: ...
    @property
    def key_source(self) -> str: ...
    @property
    def price_per_m(self) -> tuple[float, float] | None: ...


class Allowed(NamedTuple):
    """Every remaining limit fits: the entries allowed, their worst costs, what was removed."""

    entries: list[Any]
    cost: float
    sys_cost: float
    excluded: dict[str, str]


class Short(NamedTuple):
    """The limit that refuses, what renewing its leases would need, and a detail."""

    spec: LimitSpec
    needs: dict[str, float]
    detail: str


def entry_cost(entry: Entry, tokens_in: int, tokens_out: int) -> float | None:
    price = entry.price_per_m
    if price is None:
        return None
    return (tokens_in * price[0] + tokens_out * price[1]) / 1e6


def worst(entries: Iterable[Entry], tokens_in: int, tokens_out: int) -> float:
    """The most any of ``entries`` costs for the request (unpriced ones aside)."""
    costs = [entry_cost(e, tokens_in, tokens_out) for e in entries]
    return max((c for c in costs if c is not None), default=0.0)


def short(
    book: LeaseBook,
    specs: Iterable[LimitSpec],
    tokens: float,
    epoch: float,
    needs: dict[str, float],
    budget_cost: float = 0.0,
) -> LimitSpec | None:
    """The first spec without room for the request (noting what it needs), or ``None``."""
    first = None
    for spec in specs:
        amount = budget_cost if spec.kind == "budget" else tokens if spec.counts_tokens else 1.0
        if amount <= 0.0:
            continue  # a free model spends nothing: budgets do not govern it
        if book.lease(spec, epoch).free + 1e-12 < amount:
            needs[spec.key] = amount
            first = first or spec
    return first


def steering(
    book: LeaseBook,
    plan: QuotaPlan,
    entries: Sequence[Entry],
    tokens_in: int,
    tokens_out: int,
    epoch: float,
) -> dict[str, str]:
    """Providers a quota would remove from ``entries`` now, with why (for ``explain``;
    from what this process holds, no I/O, nothing taken)."""
    tokens = float(tokens_in + tokens_out)
    excluded: dict[str, str] = {}
    for provider, specs in plan.providers.items():
        if any(e.provider == provider for e in entries):
            spec = short(book, specs, tokens, epoch, {})
            if spec is not None:
                excluded[provider] = f"provider quota: {spec.limit} reached"
    system_entries = [e for e in entries if e.key_source == "system"]
    if plan.system and system_entries:
        cost = worst(system_entries, tokens_in, tokens_out)
        spec = short(book, plan.system, tokens, epoch, {}, cost)
        if spec is not None:
            for e in system_entries:
                excluded.setdefault(e.provider, f"system key quota: {spec.limit} reached")
    return excluded


def shortage(
    book: LeaseBook,
    plan: QuotaPlan,
    user_specs: Sequence[LimitSpec],
    entries: Sequence[Entry],
    tokens_in: int,
    tokens_out: int,
    epoch: float,
    *,
    final: bool,
) -> Allowed | Short:
    """What may run, or the limit that refuses (with what renewing would need).

    Before a renewal (``final=False``) any shortage is only reported; after it, quotas
    that steer remove entries and a spent budget falls back to free or cheapest models.
    """
    tokens = float(tokens_in + tokens_out)
    allowed = list(entries)
    needs: dict[str, float] = {}
    excluded: dict[str, str] = {}
    steer: tuple[LimitSpec, str] | None = None
    first: LimitSpec | None = None  # the first limit short of room
    for provider, specs in plan.providers.items():
        if not any(e.provider == provider for e in allowed):
            continue
        spec = short(book, specs, tokens, epoch, needs)
        first = first or spec
        if spec is not None and final:
            allowed = [e for e in allowed if e.provider != provider]
            excluded[provider] = f"provider quota: {spec.limit} reached"
            steer = steer or (spec, excluded[provider])
    system_entries = [e for e in allowed if e.key_source == "system"]
    if plan.system and system_entries:
        cost = worst(system_entries, tokens_in, tokens_out)
        spec = short(book, plan.system, tokens, epoch, needs, cost)
        first = first or spec
        if spec is not None and final:
            allowed = [e for e in allowed if e.key_source != "system"]
            reason = f"system key quota: {spec.limit} reached"
            for e in system_entries:
                excluded.setdefault(e.provider, reason)
            steer = (spec, reason)
    whole = (*plan.whole, *user_specs)
    budgets = [s for s in whole if s.kind == "budget"]
    if budgets and not plan.allow_unpriced:
        priced = [e for e in allowed if e.price_per_m is not None]
        if not priced and allowed:
            return Short(
                budgets[0], needs, "no model with a known price (see budget.allow_unpriced)"
            )
        allowed = priced
    cost = worst(allowed, tokens_in, tokens_out)
    spec = short(book, whole, tokens, epoch, needs, cost)
    first = first or spec
    if first is not None and not final:
        return Short(first, needs, "")
    if spec is not None and spec.kind == "budget":
        allowed, cost = _within_budget(book, plan, whole, allowed, tokens_in, tokens_out, epoch)
        spec = short(book, whole, tokens, epoch, {}, cost) if allowed else spec
    if spec is not None:
        return Short(spec, needs, "")
    if not allowed:
        if steer is None:
            raise ValueError("admission needs at least one chain entry")
        return Short(steer[0], needs, steer[1])
    sys_cost = worst((e for e in allowed if e.key_source == "system"), tokens_in, tokens_out)
    return Allowed(allowed, cost, sys_cost, excluded)


def _within_budget(
    book: LeaseBook,
    plan: QuotaPlan,
    whole: Sequence[LimitSpec],
    entries: list[Any],
    tokens_in: int,
    tokens_out: int,
    epoch: float,
) -> tuple[list[Any], float]:
    """With the budget spent: free models only, or (``cheapest``) the cheapest that fit."""
    room = min((book.lease(s, epoch).free for s in whole if s.kind == "budget"), default=0.0)
    costs = [(entry_cost(e, tokens_in, tokens_out) or 0.0, e) for e in entries]
    free = [e for c, e in costs if c == 0.0]
    if plan.on_exhausted == "cheapest":
        fitting = sorted(
            ((c, i, e) for i, (c, e) in enumerate(costs) if c <= room),
            key=lambda t: (t[0], t[1]),
        )
        if fitting:
            cheapest = fitting[0][0]
            kept = [e for c, _, e in fitting if c == cheapest]
            return kept, cheapest
    return free, 0.0


def refusal(
    book: LeaseBook, spec: LimitSpec, detail: str, at: datetime, alerts: AlertSink | None
) -> QuotaExceededError:
    """The error for a refusal by ``spec`` (a budget's first refusal fires its 1.0 alert)."""
    lease = book.lease(spec, at.timestamp())
    if spec.kind == "budget" and spec.alert_at:
        spent = lease.committed + lease.written + lease.pending
        check_alerts(alerts, lease, spent, refused=True)
    if spec.kind == "budget":
        bounds = lease.bounds or spec.bounds(at)
        retry_after = max(0.0, (bounds.end - at).total_seconds())
        resets_at = bounds.end
        cls: type[QuotaExceededError] = BudgetExceededError
    else:
        oldest = lease.oldest
        horizon = spec.window_s + spec.bucket_s
        retry_after = (
            spec.bucket_s
            if oldest is None
            else max(spec.bucket_s, oldest + horizon - at.timestamp())
        )
        resets_at = at + timedelta(seconds=retry_after)
        cls = QuotaExceededError
    return cls(
        scope=spec.scope,
        limit=spec.limit,
        used=lease.used(),
        allowed=spec.allowed,
        retry_after=retry_after,
        resets_at=resets_at,
        detail=detail,
    )
