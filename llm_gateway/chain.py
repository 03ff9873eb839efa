"""Which providers a tenant's request may use, and in what order.

``build_route`` runs once per loaded config (it is cached with it), together with the routes
of every model group and concrete model a request may name with ``model=``; ``route_for`` picks
one of them (a dict lookup) and ``order_chain`` runs per request and only reads health state:
no I/O, a handful of comparisons.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from usage.pricing import Price

from .config import GroupEntry, TenantConfig
from .errors import ContextWindowExceededError, InvalidRequestError, UnknownModelError
from .governance.admission import QuotaPlan
from .health import HealthRegistry
from .keys import ApiKey
from .providers import ProviderSettings

__all__ = [
    "ChainEntry",
    "TenantRoute",
    "above_window",
    "build_route",
    "explain_route",
    "larger_windows",
    "order_chain",
    "rate_limit_wait",
    "route_for",
    "score",
]

# (provider, model) -> the model's price, e.g. ``PriceBook.lookup``.
PriceLookup = Callable[[str, str], Price | None]

# Score weights (lower is better). The unit is "seconds of expected latency".
LATENCY_PRIOR = 1.0  # a key with no history is assumed to answer in 1 s
ERROR_WEIGHT = 4.0  # a 25% error rate doubles the expected latency
COST_WEIGHT = 100.0  # one US cent of estimated cost weighs like one second
NO_HEADROOM_PENALTY = 2.0  # the last response said no requests remain in the window


@dataclass(frozen=True, slots=True)
class ChainEntry:
    """One provider as a tenant may use it: its key, model and static facts for scoring."""

    provider: str
    model: str
    key: ApiKey | None
    key_source: str  # "tenant", "system" or "none" (keyless local server)
    fingerprint: str
    context_window: int | None
    price_per_m: tuple[float, float] | None  # input, output USD per million tokens


_NO_ROUTES: Mapping[str, TenantRoute] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class TenantRoute:
    """A tenant's config with its candidate entries, built once per config load.

    The tenant's usual route also carries the routes ``model=`` may select, built with it:
    ``groups`` (the tenant's model groups over the router's of the same name) and ``models``
    (each concrete model, over the providers that serve it). A group's route has ``group``
    set: its entries keep the group's order, and ``excluded`` is keyed ``provider/model``.
    """

    config: TenantConfig
    entries: tuple[ChainEntry, ...]  # preferred, then fallback_order, then the rest
    excluded: Mapping[str, str]  # provider -> why it can never be used for this tenant
    pinned: frozenset[str]  # providers whose place is fixed (preferred, fallback_order)
    group: str | None = None  # the model group this route serves
    source: str | None = None  # a group's: "tenant" or "router"
    members: tuple[tuple[str, str], ...] = ()  # a group's (provider, model) list, in order
    groups: Mapping[str, TenantRoute] = field(default_factory=lambda: _NO_ROUTES)
    models: Mapping[str, TenantRoute] = field(default_factory=lambda: _NO_ROUTES)
    quota: QuotaPlan | None = None  # budgets and limits (set by the router, per config load)


def _per_m(price: PriceLookup, provider: str, model: str) -> tuple[float, float] | None:
    prices = price(provider, model)
    return None if prices is None else (float(prices.input_per_m), float(prices.output_per_m))


def _for_model(
    entry: ChainEntry, model: str, settings: ProviderSettings, price: PriceLookup
) -> ChainEntry:
    """``entry`` (a provider with the tenant's key) asking for ``model`` instead."""
    if model == entry.model:
        return entry
    # The constructor, not dataclasses.replace: this runs for every model at each load.
    return ChainEntry(
        entry.provider,
        model,
        entry.key,
        entry.key_source,
        entry.fingerprint,
        settings.models.get(model),
        _per_m(price, entry.provider, model),
    )


def build_route(
    config: TenantConfig,
    providers: Mapping[str, ProviderSettings],
    price: PriceLookup,
    fingerprint: Callable[[ApiKey], str],
    model_groups: Mapping[str, Sequence[GroupEntry]] = MappingProxyType({}),
    quota: QuotaPlan | None = None,
) -> TenantRoute:
    """Candidate entries for a tenant: its own key first, else the system key.

    ``quota`` (the tenant's budgets and limits) is carried by every route built here, so a
    group's or a concrete model's request is governed like the usual chain.

    ``fingerprint`` is the deployment's keyed fingerprint (:class:`~.keys.Fingerprinter`).
    ``model_groups`` are the router's groups; the tenant's own group of a name wins. The
    routes of every group and concrete model are built here, once per config load.
    """
    base = _usual_route(config, providers, price, fingerprint)
    by_provider = {e.provider: e for e in base.entries}
    groups: dict[str, TenantRoute] = {}
    own = config.inference.model_groups
    for name, members in {**model_groups, **own}.items():
        entries: list[ChainEntry] = []
        excluded: dict[str, str] = {}
        for member in members:
            label = f"{member.provider}/{member.model}"
            usable = by_provider.get(member.provider)
            if usable is None:
                excluded[label] = base.excluded.get(
                    member.provider, "the router has no settings for this provider"
                )
                continue
            entries.append(_for_model(usable, member.model, providers[usable.provider], price))
        groups[name] = TenantRoute(
            config,
            tuple(entries),
            MappingProxyType(excluded),
            frozenset(e.provider for e in entries),
            group=name,
            source="tenant" if name in own else "router",
            members=tuple((m.provider, m.model) for m in members),
            quota=quota,
        )
    # Every model a provider serves (its known models, its default, the tenant's pick); a
    # provider the tenant cannot use stays in that model's ``excluded``, with the reason.
    serving: dict[str, list[ChainEntry]] = {}
    refused: dict[str, dict[str, str]] = {}
    for name, settings in providers.items():
        usable = by_provider.get(name)
        known = (settings.default_model, *settings.models)
        for model in dict.fromkeys((usable.model, *known) if usable else known):
            serving.setdefault(model, [])
            if usable is None:
                refused.setdefault(model, {})[name] = base.excluded.get(name, "not usable")
            else:
                serving[model].append(_for_model(usable, model, settings, price))
    place = {e.provider: i for i, e in enumerate(base.entries)}  # preferred first, as usual
    models = {
        model: TenantRoute(
            config,
            tuple(sorted(entries, key=lambda e: place[e.provider])),
            MappingProxyType(refused.get(model, {})),
            base.pinned & {e.provider for e in entries},
            quota=quota,
        )
        for model, entries in serving.items()
    }
    return dataclasses.replace(
        base, groups=MappingProxyType(groups), models=MappingProxyType(models), quota=quota
    )


def route_for(route: TenantRoute, model: str | None) -> TenantRoute:
    """The route a request with ``model=`` uses: a group's, else a concrete model's.

    Raises :class:`UnknownModelError` (listing the groups and models) for any other name.
    """
    if model is None:
        return route
    if not isinstance(model, str):
        raise InvalidRequestError(
            f"parameter 'model' names a model or model group: expected a string, got"
            f" {type(model).__name__}",
            parameter="model",
        )
    found = route.groups.get(model) or route.models.get(model)
    if found is None:
        raise UnknownModelError(model, sorted(route.groups), sorted(route.models))
    return found


def _usual_route(
    config: TenantConfig,
    providers: Mapping[str, ProviderSettings],
    price: PriceLookup,
    fingerprint: Callable[[ApiKey], str],
) -> TenantRoute:
    inference = config.inference
    candidates: dict[str, ChainEntry] = {}
    excluded: dict[str, str] = {}
    for name, settings in providers.items():
        key = config.keys.get(name)
        source = "tenant"
        if key is None and inference.use_system_keys:
            key, source = settings.api_key, "system"
        if key is None and settings.requires_key:
            excluded[name] = (
                "no tenant key and system keys are disabled for this tenant"
                if not inference.use_system_keys
                else "no tenant key and no system key"
            )
            continue
        if key is None:
            source = "none"
        model = inference.preferred_models.get(name) or settings.default_model
        candidates[name] = ChainEntry(
            provider=name,
            model=model,
            key=key,
            key_source=source,
            fingerprint=fingerprint(key) if key is not None else "nokey",
            context_window=settings.models.get(model),
            price_per_m=_per_m(price, name, model),
        )
    for name in config.keys:
        if name not in providers:
            excluded[name] = "tenant has a key but the router has no settings for this provider"
    for wanted, role in (
        (inference.preferred_provider, "preferred provider"),
        *((name, "in fallback_order") for name in inference.fallback_order),
    ):
        if wanted and wanted not in providers and wanted not in excluded:
            excluded[wanted] = f"{role}, but the router has no settings for this provider"
    order: list[str] = []
    for wanted in (inference.preferred_provider, *inference.fallback_order):
        if wanted and wanted in candidates and wanted not in order:
            order.append(wanted)
    pinned = frozenset(order)
    order.extend(n for n in candidates if n not in pinned)
    return TenantRoute(config, tuple(candidates[n] for n in order), excluded, pinned)


def score(entry: ChainEntry, health: HealthRegistry, estimated_tokens: int) -> float:
    """Expected cost of trying ``entry``, in seconds-equivalent; lower is better."""
    state = health.peek(entry.provider, entry.fingerprint)
    latency = LATENCY_PRIOR
    value = 0.0
    if state is not None:
        if state.latency_ewma is not None:
            latency = state.latency_ewma
        latency *= 1.0 + ERROR_WEIGHT * state.error_ewma
        if state.ratelimit_remaining_requests == 0:
            value += NO_HEADROOM_PENALTY
    value += latency
    if entry.price_per_m is not None:
        # Input and output alike: the output size is not known before the call.
        value += COST_WEIGHT * estimated_tokens * max(entry.price_per_m) / 1_000_000
    return value


def order_chain(
    route: TenantRoute,
    health: HealthRegistry,
    estimated_tokens: int,
    now: float,
    skipped: dict[str, str] | None = None,
) -> list[ChainEntry]:
    """The entries to try for one request, in order.

    The preferred provider (and an explicit ``fallback_order``) keep their place; the rest
    follow, those with the tenant's own key first, each group ordered by :func:`score`. A
    model group's entries keep the group's order. Entries whose model cannot fit
    ``estimated_tokens`` or whose key is blocked (open breaker, Retry-After) are left out and
    reported in ``skipped``. Without ``auto_failover`` only the first usable entry is returned
    (the preferred provider's, outside a group).
    """
    inference = route.config.inference
    in_group = route.group is not None
    fixed: list[ChainEntry] = []
    rest: list[ChainEntry] = []
    for entry in route.entries:
        if entry.context_window is not None and estimated_tokens > entry.context_window:
            if skipped is not None:
                skipped[_label(route, entry)] = (
                    f"{entry.model} holds {entry.context_window} tokens, {estimated_tokens} needed"
                )
            continue
        reason = health.blocked(health.peek(entry.provider, entry.fingerprint), now)
        if reason is not None:
            if skipped is not None:
                skipped[_label(route, entry)] = reason
            continue
        (fixed if in_group or entry.provider in route.pinned else rest).append(entry)
    if len(rest) > 1:
        # The tenant's own keys before the system's, each group by score.
        rest.sort(key=lambda e: (e.key_source != "tenant", score(e, health, estimated_tokens)))
    chain = fixed + rest
    if not inference.auto_failover:
        # Only the preferred provider may serve; if it is blocked, nothing else is tried.
        preferred = inference.preferred_provider
        if preferred is not None and not in_group:
            return [e for e in chain if e.provider == preferred]
        return chain[:1]
    return chain


def _label(route: TenantRoute, entry: ChainEntry) -> str:
    # A group may list one provider twice (two models): name both there.
    return entry.provider if route.group is None else f"{entry.provider}/{entry.model}"


def above_window(chain: Sequence[ChainEntry], floor: int) -> list[ChainEntry]:
    """The entries whose context window is known and larger than ``floor`` tokens."""
    return [e for e in chain if e.context_window is not None and e.context_window > floor]


def larger_windows(
    chain: Sequence[ChainEntry], error: ContextWindowExceededError
) -> tuple[list[ChainEntry], int]:
    """After ``error`` refused an entry of a group's ``chain``: the entries after it that may
    hold the request, and the window that refused (what the provider stated, else ours).

    An entry whose window is unknown is not tried: it may be just as small.
    """
    at = next(
        (i for i, e in enumerate(chain) if (e.provider, e.model) == (error.provider, error.model)),
        len(chain) - 1,
    )
    floor = error.limit if error.limit is not None else (chain[at].context_window or 0)
    return above_window(chain[at + 1 :], floor), floor


def rate_limit_wait(route: TenantRoute, health: HealthRegistry, now: float) -> float | None:
    """Seconds until the first key of the chain that only waits out a 429 is usable again."""
    inference = route.config.inference
    entries = route.entries
    if not inference.auto_failover:
        preferred = [e for e in entries if e.provider == inference.preferred_provider]
        entries = (route.group is None and tuple(preferred[:1])) or entries[:1]
    waits = [
        w
        for e in entries
        if (w := health.rate_limit_wait(e.provider, e.fingerprint, now)) is not None
    ]
    return min(waits) if waits else None


def explain_route(
    route: TenantRoute, health: HealthRegistry, estimated_tokens: int, now: float
) -> dict[str, Any]:
    """The chain a request would use now, each entry's score, and why others are left out."""
    skipped: dict[str, str] = {}
    chain = order_chain(route, health, estimated_tokens, now, skipped)
    return {
        "tenant_id": str(route.config.tenant_id),
        "group": route.group,
        "auto_failover": route.config.inference.auto_failover,
        "chain": [
            {
                "provider": e.provider,
                "model": e.model,
                "key_source": e.key_source,
                "key_fingerprint": e.fingerprint,
                "score": round(score(e, health, estimated_tokens), 4),
            }
            for e in chain
        ],
        "excluded": {**route.excluded, **skipped},
    }
