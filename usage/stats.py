"""Read side of the ledger: per-tenant usage statistics and rate-limit status.

These read what PostgreSQL holds: rows still queued in a tracker (or spooled) are not counted;
``await tracker.flush()`` first for read-your-writes.

Rate limits come from ``tenants.inference_config -> 'rate_limits' -> <provider>``, an object
``{"requests_per_minute": int, "tokens_per_minute": int, "requests_per_day": int}``; each key
that is absent falls back to :data:`DEFAULT_RATE_LIMITS`. Windows are rolling (the last 60 s
and the last 24 h), and every attempt that reached the provider counts, failed ones included,
because providers count them too.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "DEFAULT_RATE_LIMITS",
    "ModelUsage",
    "RateLimitState",
    "RateLimitStatus",
    "RateLimits",
    "TenantUsageStats",
    "UsageBacklog",
    "check_rate_limit_status",
    "get_tenant_usage_stats",
    "status_for",
]


@dataclass(frozen=True, slots=True)
class UsageBacklog:
    """A tracker's counters, for dashboards and alerts (no secrets in ``last_error``).

    ``queued``: rows in memory (``in_flight`` of them being written). ``spooled_rows`` /
    ``spooled_files``: waiting in the spool directory for replay. ``written_rows``: rows
    PostgreSQL confirmed since start (a replayed row it already had counts, and also counts in
    ``duplicate_rows``). ``spooled_total`` / ``replayed_rows``: rows this tracker wrote to and
    replayed from the spool. ``rejected_rows``: rows PostgreSQL refused (kept in
    ``<spool>/rejected``). ``corrupt_lines``: spool lines that could not be read.
    ``failed_batches``: failed write attempts (each retry counts). ``dropped_rows``: rows
    ``record()`` refused because ``max_queued`` rows were already in memory (the only rows
    ever lost; each episode is logged). ``foreign_files``: spool files not owned by this user,
    set aside unread in ``<spool>/rejected``. ``rollup_pending``: ranges of replayed hours
    whose rollup refresh failed and is retried.
    """

    queued: int
    in_flight: int
    spooled_rows: int
    spooled_files: int
    written_rows: int
    duplicate_rows: int
    spooled_total: int
    replayed_rows: int
    rejected_rows: int
    corrupt_lines: int
    failed_batches: int
    dropped_rows: int
    foreign_files: int
    rollup_pending: int
    database_available: bool
    last_error: str | None
    last_error_at: datetime | None


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Limits for one provider; ``None`` means no limit on that dimension."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    requests_per_day: int | None = None


#: Defaults when a tenant configures none: the published free / entry tier of each provider
#: (Groq free tier for llama-3.3-70b-versatile; OpenRouter free models; LLM7 anonymous tier;
#: OpenAI usage tier 1 for gpt-4o-mini). ``local`` has no limits. Configure real ones per tenant.
DEFAULT_RATE_LIMITS: Final[dict[str, RateLimits]] = {
    "groq": RateLimits(requests_per_minute=30, tokens_per_minute=6_000, requests_per_day=1_000),
    "openrouter": RateLimits(
        requests_per_minute=20, tokens_per_minute=None, requests_per_day=1_000
    ),
    "llm7": RateLimits(requests_per_minute=40, tokens_per_minute=None, requests_per_day=10_000),
    "openai": RateLimits(
        requests_per_minute=500, tokens_per_minute=200_000, requests_per_day=10_000
    ),
    "local": RateLimits(),
}

RateLimitState = Literal["healthy", "normal", "warning", "critical"]


def status_for(percent: float) -> RateLimitState:
    """healthy < 50 % <= normal < 75 % <= warning < 90 % <= critical."""
    if percent < 50:
        return "healthy"
    if percent < 75:
        return "normal"
    if percent < 90:
        return "warning"
    return "critical"


@dataclass(frozen=True, slots=True)
class ModelUsage:
    """Usage of one provider and model by one tenant in a window.

    ``cost_usd`` sums the priced rows only; ``unpriced_requests`` counts rows whose model had
    no known price (their cost is NULL, not 0). Latencies are in milliseconds.
    """

    provider: str
    model_name: str
    requests: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cost_usd: Decimal
    unpriced_requests: int
    avg_latency_ms: float
    p95_latency_ms: float
    errors: int
    rate_limited: int


@dataclass(frozen=True, slots=True)
class TenantUsageStats:
    """A tenant's usage from ``since`` on (``until`` is when it was read), busiest first."""

    tenant_id: uuid.UUID
    hours: float
    since: datetime
    until: datetime
    models: tuple[ModelUsage, ...]

    @property
    def requests(self) -> int:
        return sum(m.requests for m in self.models)

    @property
    def total_tokens(self) -> int:
        return sum(m.total_tokens for m in self.models)

    @property
    def cost_usd(self) -> Decimal:
        return sum((m.cost_usd for m in self.models), Decimal(0))

    @property
    def errors(self) -> int:
        return sum(m.errors for m in self.models)

    @property
    def rate_limited(self) -> int:
        return sum(m.rate_limited for m in self.models)


@dataclass(frozen=True, slots=True)
class RateLimitStatus:
    """Where a tenant stands against one provider's limits.

    ``usage_percent`` is the highest of the per-dimension percentages (0 when nothing is
    limited); ``should_failover`` is true when the status is ``critical``.
    """

    tenant_id: uuid.UUID
    provider: str
    requests_last_minute: int
    tokens_last_minute: int
    requests_last_day: int
    tokens_last_day: int
    limits: RateLimits
    limits_source: Literal["tenant", "default", "mixed"]
    usage_percent: float
    status: RateLimitState
    should_failover: bool
    checked_at: datetime


_USAGE_SQL = """
SELECT provider, model_name,
       count(*)                                          AS requests,
       coalesce(sum(input_tokens), 0)::bigint            AS input_tokens,
       coalesce(sum(output_tokens), 0)::bigint           AS output_tokens,
       coalesce(sum(total_tokens), 0)::bigint            AS total_tokens,
       coalesce(sum(estimated_cost_usd), 0)              AS cost_usd,
       count(*) FILTER (WHERE NOT price_known)           AS unpriced,
       avg(latency_ms)::float8                           AS avg_latency,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_latency,
       count(*) FILTER (WHERE status <> 'success')       AS errors,
       count(*) FILTER (WHERE status = 'rate_limit')     AS rate_limited
FROM model_usage_stats
WHERE tenant_id = $1 AND "timestamp" >= $2
GROUP BY provider, model_name
ORDER BY requests DESC, provider, model_name
"""

_WINDOW_SQL = "SELECT now() - $1::float8 * interval '1 hour' AS since, now() AS until"


async def get_tenant_usage_stats(
    pool: asyncpg.Pool[asyncpg.Record], tenant_id: uuid.UUID | str, hours: float = 24
) -> TenantUsageStats:
    """Per provider and model: requests, tokens, cost, avg/p95 latency, errors, 429s."""
    tid = tenant_id if isinstance(tenant_id, uuid.UUID) else uuid.UUID(tenant_id)
    if hours <= 0:
        raise ValueError("hours must be positive")
    async with pool.acquire() as conn:
        window: Any = await conn.fetchrow(_WINDOW_SQL, float(hours))
        since, until = window["since"], window["until"]
        rows = await conn.fetch(_USAGE_SQL, tid, since)
    models = tuple(
        ModelUsage(
            provider=r["provider"],
            model_name=r["model_name"],
            requests=r["requests"],
            input_tokens=r["input_tokens"],
            output_tokens=r["output_tokens"],
            total_tokens=r["total_tokens"],
            cost_usd=r["cost_usd"],
            unpriced_requests=r["unpriced"],
            avg_latency_ms=r["avg_latency"],
            p95_latency_ms=r["p95_latency"],
            errors=r["errors"],
            rate_limited=r["rate_limited"],
        )
        for r in rows
    )
    return TenantUsageStats(tid, float(hours), since, until, models)


_RATE_SQL = """
SELECT count(*) FILTER (WHERE "timestamp" >= now() - interval '1 minute') AS req_min,
       coalesce(sum(total_tokens) FILTER (WHERE "timestamp" >= now() - interval '1 minute'), 0)
           ::bigint AS tok_min,
       count(*) AS req_day,
       coalesce(sum(total_tokens), 0)::bigint AS tok_day,
       (SELECT (inference_config -> 'rate_limits')::text FROM tenants WHERE id = $1)
           AS limits,
       now() AS checked_at
FROM model_usage_stats
WHERE tenant_id = $1 AND provider = $2 AND "timestamp" >= now() - interval '1 day'
  AND status <> 'quota_exceeded'
"""

_LIMIT_KEYS: Final = ("requests_per_minute", "tokens_per_minute", "requests_per_day")

# What the router's admission acts on for a limit the tenant configured (governance leases):
# uses reconciled into the window plus what live processes hold. A partial bucket counts
# whole, as admission counts it.
_GOVERNED_SQL = """
SELECT coalesce((SELECT sum(amount) FROM quota_uses
                  WHERE limit_key = $1 AND bucket > now() - make_interval(secs => $2)), 0)
     + coalesce((SELECT sum(amount) FROM quota_leases
                  WHERE limit_key = $1 AND expires_at >= now()), 0)
"""
_WINDOWS: Final = {
    "requests_per_minute": 61.0,
    "tokens_per_minute": 61.0,
    "requests_per_day": 86_460.0,
}


def _provider_id(name: str) -> str:
    """The provider id the router uses (``'Groq (Llama 3.3 70B)'`` -> ``'groq'``), through the
    one normalisation in :func:`llm_gateway.config.normalize_provider`; a name it does not
    know is kept as given (the ledger accepts any provider)."""
    # Imported here: llm_gateway imports this package, so importing it at module level would
    # make ``import usage`` circular.
    from llm_gateway.config import normalize_provider
    from llm_gateway.errors import UnknownProviderError

    try:
        return normalize_provider(name)
    except UnknownProviderError:
        return name


def _entry_for(tenant_id: uuid.UUID, provider: str, raw: str | None) -> tuple[str, object] | None:
    """The tenant's ``rate_limits`` entry for ``provider`` (an id), under whatever spelling
    of the name it was written: ``(key, value)``, or ``None``."""
    from llm_gateway.errors import InvalidTenantConfigError

    if raw is None or raw == "null":
        return None
    entries = json.loads(raw)
    if not isinstance(entries, dict):
        raise InvalidTenantConfigError(tenant_id, "inference_config.rate_limits", "not an object")
    found = [(k, v) for k, v in entries.items() if _provider_id(k) == provider]
    if len(found) > 1:
        keys = ", ".join(repr(k) for k, _ in found)
        raise InvalidTenantConfigError(
            tenant_id, f"inference_config.rate_limits.{found[1][0]}", f"{keys} name one provider"
        )
    return found[0] if found else None


def _parse_limits(
    tenant_id: uuid.UUID, provider: str, raw: str | None
) -> tuple[RateLimits, Literal["tenant", "default", "mixed"], frozenset[str]]:
    """The limits in force, where they come from, and which the tenant set itself."""
    # The one validation of rate_limits, the router's (imported here: see _provider_id).
    from llm_gateway.config import parse_rate_limits

    default = DEFAULT_RATE_LIMITS.get(provider, RateLimits())
    _entry_for(tenant_id, provider, raw)  # two spellings of one provider: an error
    conf = parse_rate_limits(tenant_id, raw).get(provider)
    given: dict[str, int] = {} if conf is None else conf.model_dump(exclude_none=True)
    values = {key: given.get(key, getattr(default, key)) for key in _LIMIT_KEYS}
    source: Literal["tenant", "default", "mixed"] = (
        "tenant" if len(given) == len(_LIMIT_KEYS) else "mixed" if given else "default"
    )
    return RateLimits(**values), source, frozenset(given)


def _percent(used: int, limit: int | None) -> float:
    return 0.0 if not limit else 100.0 * used / limit


async def check_rate_limit_status(
    pool: asyncpg.Pool[asyncpg.Record], tenant_id: uuid.UUID | str, provider: str
) -> RateLimitStatus:
    """Requests and tokens in the last minute and day against the tenant's limits.

    ``provider`` may be any spelling the router accepts (``"Groq"``, ``"groq"``, ...); it is
    normalised as the router does, and so are the keys of the tenant's ``rate_limits``.

    Raises :class:`~llm_gateway.errors.InvalidTenantConfigError` naming the field when the
    tenant's ``rate_limits`` entry is malformed, or two keys name one provider. A tenant
    without a row gets the defaults.

    Counts come from the usage rows (refusals excluded); for a limit the tenant configured,
    which the router enforces, a count is at least what admission acts on: uses in the sliding
    window plus what router processes hold (leases), so requests in flight count too.
    """
    tid = tenant_id if isinstance(tenant_id, uuid.UUID) else uuid.UUID(tenant_id)
    provider = _provider_id(provider)
    async with pool.acquire() as conn:
        found: Any = await conn.fetchrow(_RATE_SQL, tid, provider)
        row = dict(found)
        limits, source, configured = _parse_limits(tid, provider, row["limits"])
        if configured and await conn.fetchval("SELECT to_regclass('quota_uses')"):
            # A quota the tenant set is enforced by the router: report the numbers it acts on.
            for key, column in zip(_LIMIT_KEYS, ("req_min", "tok_min", "req_day"), strict=True):
                if key in configured:
                    held = await conn.fetchval(
                        _GOVERNED_SQL, f"t:{tid}:p:{provider}:{key}", _WINDOWS[key]
                    )
                    # Admitted requests not yet in the rows (in flight, queued) count too.
                    row[column] = max(row[column], round(held))
    percent = max(
        _percent(row["req_min"], limits.requests_per_minute),
        _percent(row["tok_min"], limits.tokens_per_minute),
        _percent(row["req_day"], limits.requests_per_day),
    )
    state = status_for(percent)
    return RateLimitStatus(
        tenant_id=tid,
        provider=provider,
        requests_last_minute=row["req_min"],
        tokens_last_minute=row["tok_min"],
        requests_last_day=row["req_day"],
        tokens_last_day=row["tok_day"],
        limits=limits,
        limits_source=source,
        usage_percent=round(percent, 2),
        status=state,
        should_failover=state == "critical",
        checked_at=row["checked_at"],
    )
