"""Request preparation: checks, chain, ledger and admission; re-planning between attempts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

from usage import ModelUsageTracker
from usage.analytics.labels import InvalidLabelError, labels_from
from usage.pricing import PriceBook

from .attempts import AttemptKind, run_attempts
from .chain import (
    ChainEntry,
    TenantRoute,
    above_window,
    larger_windows,
    order_chain,
    rate_limit_wait,
    route_for,
)
from .errors import ContextWindowExceededError, InvalidRequestError, NoProviderAvailableError
from .governance.admission import Admission
from .governance.gate import QuotaGate, estimate_input_tokens
from .governance.keys import KeyQuota
from .health import HealthRegistry
from .ledger import RequestLedger
from .observability import RequestObservation
from .tenant_store import TenantConfigStore, as_tenant_id
from .types import TaskType

V = TypeVar("V")
R = TypeVar("R")

# Parameters the router sets itself (stream) or that would change the call
# rather than the request (the SDKs' extra_*): refused up front, never sent.
RESERVED: dict[str, str] = {
    "stream": "use stream_for_tenant() to stream",
    "extra_headers": "the router sets the request's headers",
    "extra_query": "the router builds the request's URL",
    "extra_body": "pass body fields as keyword arguments",
}

# A ledger's endpoint, user, task type, caller metadata and labels (session id, tags).
RowFields = tuple[
    str, str | None, TaskType, Mapping[str, Any] | None, tuple[str | None, list[str] | None]
]


def reserved_parameter(params: Mapping[str, Any]) -> InvalidRequestError:
    """The error for the first reserved name in ``params`` (the caller found one)."""
    name = next(p for p in params if p in RESERVED)
    return InvalidRequestError(f"parameter {name!r} is reserved: {RESERVED[name]}", parameter=name)


def request_labels(
    session_id: object, tags: object, metadata: Mapping[str, Any] | None
) -> tuple[str | None, list[str] | None]:
    """Validated session id and tags, or :class:`InvalidRequestError` naming the field."""
    try:
        return labels_from(session_id, tags, metadata)
    except InvalidLabelError as exc:
        raise InvalidRequestError(str(exc), parameter=exc.field) from None


class PlannedRequest:
    """One admitted request: what its attempts need (the chain is what admission allowed)."""

    __slots__ = (
        "admission",
        "budget",
        "chain",
        "deadline",
        "ledger",
        "route",
        "started",
        "tid",
        "tokens_in",
    )

    def __init__(
        self,
        tid: uuid.UUID,
        route: TenantRoute,
        chain: list[ChainEntry],
        ledger: RequestLedger,
        admission: Admission | None,
        tokens_in: int,
        started: float,
        deadline: float,
        budget: float,
    ) -> None:
        self.tid = tid
        self.route = route
        self.chain = chain
        self.ledger = ledger
        self.admission = admission  # None without quotas
        self.tokens_in = tokens_in  # the input-token estimate
        self.started = started
        self.deadline = deadline  # of every attempt together: started + budget
        self.budget = budget


class RequestPlanner:
    """Plans a router's requests: route and chain from the config cache, ledger, admission,
    the attempt loop over the chain, and the chain planned again after a 429."""

    __slots__ = ("gate", "health", "prices", "store", "tracker")

    def __init__(
        self,
        store: TenantConfigStore[TenantRoute],
        health: HealthRegistry,
        gate: QuotaGate,
        prices: PriceBook,
        tracker: ModelUsageTracker | None,
    ) -> None:
        self.store = store
        self.health = health
        self.gate = gate
        self.prices = prices
        # Where the ledgers queue rows (None: nothing recorded); the router sets it on start.
        self.tracker = tracker

    async def order(
        self,
        tid: uuid.UUID,
        route: TenantRoute,
        estimated_tokens: int,
        deadline: float,
        floor: int | None = None,
    ) -> list[ChainEntry]:
        """The chain to try now. When every usable key is only waiting out a 429's
        Retry-After and the wait fits before ``deadline``, sleeps it out instead of failing.
        ``floor``: only entries whose window is larger (after a context-length refusal)."""
        health = self.health
        while True:
            # Health times come from the registry's clock (injectable), deadlines from ours.
            now = health.clock()
            chain = order_chain(route, health, estimated_tokens, now)
            if floor is not None:
                chain = above_window(chain, floor)
            if chain:
                return chain
            wait = rate_limit_wait(route, health, now)
            if wait is None or time.monotonic() + wait > deadline:
                # Only now are the reasons worth collecting.
                skipped: dict[str, str] = {}
                order_chain(route, health, estimated_tokens, now, skipped)
                raise NoProviderAvailableError(tid, {**route.excluded, **skipped})
            await asyncio.sleep(wait)

    def ledger(
        self,
        tenant_id: uuid.UUID,
        endpoint: str,
        user_id: str | None,
        task_type: TaskType,
        metadata: Mapping[str, Any] | None,
        labels: tuple[str | None, list[str] | None] = (None, None),
    ) -> RequestLedger:
        return RequestLedger(
            tenant_id,
            self.tracker,
            self.prices,
            endpoint,
            user_id,
            task_type,
            metadata,
            session_id=labels[0],
            tags=labels[1],
        )

    async def begin(
        self,
        tenant_id: uuid.UUID | str,
        messages: Sequence[Mapping[str, Any]],
        estimated_tokens: int | None,
        started: float,
        budget: float,
        model: str | None,
        params: Mapping[str, Any],
        row: RowFields,
        key_quota: KeyQuota | None = None,
        obs: RequestObservation | None = None,
    ) -> PlannedRequest:
        """Plan a request (config from cache) and admit it, ``budget`` seconds from ``started``.
        ``row``: the ledger's endpoint, user, task type, metadata and labels; ``key_quota``:
        the limits of the virtual key the request came with (its rows carry the key's id)."""
        tokens_in = (
            estimate_input_tokens(messages) if estimated_tokens is None else estimated_tokens
        )
        deadline = started + budget
        tid = as_tenant_id(tenant_id)
        # ``model``: a model group's or a concrete model's route (built with the config).
        route = route_for(await self.store.get(tid), model)
        chain = await self.order(tid, route, tokens_in, deadline)
        endpoint, user_id, task_type, metadata, labels = row
        ledger = self.ledger(tid, endpoint, user_id, task_type, metadata, labels)
        if obs is not None:
            ledger.obs = obs
            obs.begun(ledger.request_id, tid)
        plan = route.quota
        if key_quota is not None:
            ledger.virtual_key_id = key_quota.key_id
            plan = plan or self.gate.bare(tid)
        admission = (
            None
            if plan is None
            else await self.gate.admit(
                plan, tid, user_id, chain, tokens_in, params, ledger, key_quota
            )
        )
        if admission is not None:
            chain = admission.entries  # what admission allowed
        return PlannedRequest(
            tid, route, chain, ledger, admission, tokens_in, started, deadline, budget
        )

    async def attempt(self, kind: AttemptKind[V, R], req: PlannedRequest, timer: Any = None) -> R:
        """:func:`run_attempts` over the request's chain; within a model group, a
        context-length 400 moves on to the next entries with a larger window (the same request
        and ledger). ``timer`` gives each attempt its cap (adaptive timeouts; completions only)."""
        chain = req.chain
        floor: int | None = None
        while True:
            try:
                return await run_attempts(
                    kind,
                    chain,
                    ledger=req.ledger,
                    health=self.health,
                    deadline=req.deadline,
                    budget=req.budget,
                    replan=self.replan(req, floor),
                    timer=timer,
                )
            except ContextWindowExceededError as exc:
                if req.route.group is None:
                    raise  # outside a group, final like any 400
                chain, floor = larger_windows(chain, exc)
                if not chain:
                    raise

    def replan(
        self, req: PlannedRequest, floor: int | None
    ) -> Callable[[], Awaitable[list[ChainEntry]]]:
        """The chain planned again (after a 429), within what admission allowed."""
        replan = partial(self.order, req.tid, req.route, req.tokens_in, req.deadline, floor)
        return replan if req.admission is None else _within(req.admission, replan)


def _within(
    admission: Admission, replan: Callable[[], Awaitable[list[ChainEntry]]]
) -> Callable[[], Awaitable[list[ChainEntry]]]:
    """``replan`` limited to the entries admission allowed (quotas removed the others)."""
    allowed = set(admission.entries)

    async def replan_within() -> list[ChainEntry]:
        return [e for e in await replan() if e in allowed]

    return replan_within
