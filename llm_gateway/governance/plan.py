"""A tenant's quota plan, and the lease sets (draws) its requests take from, resolved once.

A request's limits depend only on the plan, its user and which entries its chain holds (a
system key, providers with a quota): a :class:`Draw` per such combination lists the leases
by what they count, so the cached path does no lookup and no dispatch per limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import Governance
from .ledger import Lease
from .limits import LimitSpec

__all__ = ["SYSTEM_BIT", "Draw", "QuotaPlan", "build_draw", "find_draw"]

SYSTEM_BIT = 1  # a draw's mask: the chain holds a system-key entry; higher bits: providers
_MAX_DRAWS = 10_000  # per plan (users x chain shapes); past it the cache starts over


@dataclass(frozen=True, slots=True)
class QuotaPlan:
    """The specs of one tenant (built once per config load) and its budget options."""

    whole: tuple[LimitSpec, ...] = ()
    system: tuple[LimitSpec, ...] = ()
    providers: dict[str, tuple[LimitSpec, ...]] = field(default_factory=dict)
    allow_unpriced: bool = False
    on_exhausted: Literal["refuse", "cheapest"] = "refuse"
    governance: Governance | None = None  # the merged sections (user_limits are per user)
    # Derived, per plan: each provider quota's mask bit; draws by (id of the request's
    # user/key specs, mask); user specs by user; user + key specs by (user, key id).
    bits: dict[str, int] = field(init=False, compare=False, repr=False)
    draws: dict[tuple[int, int], Draw] = field(
        init=False, compare=False, repr=False, default_factory=dict
    )
    users: dict[str, tuple[LimitSpec, ...]] = field(
        init=False, compare=False, repr=False, default_factory=dict
    )
    keyed: dict[tuple[str | None, str], tuple[dict[str, Any], tuple[LimitSpec, ...]]] = field(
        init=False, compare=False, repr=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        bits = {name: 2 << i for i, name in enumerate(self.providers)}
        object.__setattr__(self, "bits", bits)

    @property
    def empty(self) -> bool:
        return not (self.whole or self.system or self.providers)

    @property
    def budgeted(self) -> bool:
        return any(s.kind == "budget" for s in self.whole)


@dataclass(slots=True, eq=False)
class Draw:
    """The leases one kind of request takes from, grouped by the amount each takes."""

    ones: tuple[Lease, ...]  # rates that count requests
    toks: tuple[Lease, ...]  # tokens_per_minute: input estimate + max_tokens
    costs: tuple[Lease, ...]  # tenant and user budgets: the chain's worst-case cost
    sys_costs: tuple[Lease, ...]  # system-key budgets: the system entries' worst case
    charges: tuple[Lease, ...]  # budgets an attempt's cost counts against
    sys_charges: tuple[Lease, ...]  # ... when the attempt used a system key
    rates: tuple[Lease, ...]  # ones + toks
    budgets: tuple[Lease, ...]  # costs + sys_costs
    valid_until: float  # epoch: a budget period ends (its lease is replaced)
    owner: object  # whose leases these are (a plan shared by two governors: tests)
    specs: Sequence[LimitSpec]  # the user/key specs it was built for (keyed by their id)
    second: int = -1  # the wall-clock second of the last roll (see Lease.roll)


def find_draw(
    plan: QuotaPlan,
    user_specs: Sequence[LimitSpec],
    mask: int,
    lease: Callable[[LimitSpec, float], Lease],
    epoch: float,
    owner: object,
) -> Draw:
    """The cached draw (still of the current budget periods, of ``owner``), or a new one."""
    draw = plan.draws.get((id(user_specs), mask))
    if (
        draw is None
        or epoch >= draw.valid_until
        or draw.owner is not owner
        or draw.specs is not user_specs
    ):
        draw = build_draw(plan, user_specs, mask, lease, epoch, owner)
    return draw


def build_draw(
    plan: QuotaPlan,
    user_specs: Sequence[LimitSpec],
    mask: int,
    lease: Callable[[LimitSpec, float], Lease],
    epoch: float,
    owner: object,
) -> Draw:
    """The draw of ``plan`` for a user and a chain shape, cached on the plan."""
    specs = [*plan.whole, *user_specs]
    rate_specs = [s for s in specs if s.kind == "rate"]
    if mask & SYSTEM_BIT:
        rate_specs.extend(s for s in plan.system if s.kind == "rate")
    for name, bit in plan.bits.items():
        if mask & bit:
            rate_specs.extend(plan.providers[name])
    ones = tuple(lease(s, epoch) for s in rate_specs if not s.counts_tokens)
    toks = tuple(lease(s, epoch) for s in rate_specs if s.counts_tokens)
    costs = tuple(lease(s, epoch) for s in specs if s.kind == "budget")
    system = tuple(lease(s, epoch) for s in plan.system if s.kind == "budget")
    sys_costs = system if mask & SYSTEM_BIT else ()
    draw = Draw(
        ones=ones,
        toks=toks,
        costs=costs,
        sys_costs=sys_costs,
        charges=costs,
        sys_charges=costs + system,
        rates=ones + toks,
        budgets=costs + sys_costs,
        valid_until=min((x.ends_at for x in costs + system), default=math.inf),
        owner=owner,
        specs=user_specs,
    )
    if len(plan.draws) >= _MAX_DRAWS:
        plan.draws.clear()
    plan.draws[(id(user_specs), mask)] = draw
    return draw
