"""The exception hierarchy: every error the SDK raises derives from :class:`GatewayError`.

Errors never carry API keys: where a key must be identified, its fingerprint is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .types import Attempt

__all__ = [
    "AllProvidersFailedError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigError",
    "ConfigUnavailableError",
    "ContextWindowExceededError",
    "DatabaseError",
    "DeadlineExceededError",
    "EmptyResponseError",
    "GatewayError",
    "InvalidRequestError",
    "InvalidTenantConfigError",
    "MalformedResponseError",
    "MidStreamError",
    "NoProviderAvailableError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderTimeoutError",
    "RateLimitError",
    "RouterClosedError",
    "ServerError",
    "TenantNotFoundError",
    "UnknownModelError",
    "UnknownProviderError",
    "VirtualKeyError",
    "VirtualKeySpecError",
]


class GatewayError(Exception):
    """Root of every error raised by llm-gateway.

    ``outcome`` is the ``outcome`` label (metrics, traces) of a request that ended with it.
    """

    outcome: ClassVar[str] = "error"


# --- configuration -------------------------------------------------------------------------


class ConfigError(GatewayError):
    """A tenant's or the router's configuration cannot be used."""

    outcome = "config_error"


class UnknownProviderError(ConfigError, ValueError):
    """A provider name that the gateway does not know."""

    def __init__(self, name: str, known: Sequence[str] = ()) -> None:
        # A long name is clipped: it may be an API key pasted where a name belongs.
        self.name = name if len(name) <= 32 else f"{name[:8]}…"
        shown = repr(self.name) + (f" ({len(name)} characters)" if len(name) > 32 else "")
        hint = f" (known: {', '.join(known)})" if known else ""
        super().__init__(f"unknown provider {shown}{hint}")


class TenantNotFoundError(ConfigError, LookupError):
    """No ``tenants`` row for the id, and the router's policy is to refuse unknown tenants."""

    def __init__(self, tenant_id: object) -> None:
        self.tenant_id = str(tenant_id)
        super().__init__(f"unknown tenant {self.tenant_id}")


class InvalidTenantConfigError(ConfigError, ValueError):
    """A tenant's ``llm_tokens`` or ``inference_config`` JSONB fails validation.

    ``field`` is the dotted path of the first offending value, e.g.
    ``inference_config.preferred_models.groq``.
    """

    def __init__(self, tenant_id: object, field: str, reason: str) -> None:
        self.tenant_id = str(tenant_id)
        self.field = field
        self.reason = reason
        super().__init__(f"tenant {self.tenant_id}: invalid {field}: {reason}")


class DatabaseError(GatewayError):
    """PostgreSQL could not be reached or answered with an error."""

    outcome = "config_error"  # ConfigError's label: no usable config could be loaded


class ConfigUnavailableError(DatabaseError):
    """A tenant's configuration could not be loaded because the database failed."""


class InvalidRequestError(GatewayError, ValueError):
    """The caller's request cannot be sent: a reserved or unserialisable parameter.

    Raised before any provider is called; it writes no usage row and touches no breaker.
    ``parameter`` names the offending argument when one is known.
    """

    outcome = "invalid_request"

    def __init__(self, message: str, *, parameter: str | None = None) -> None:
        self.parameter = parameter
        super().__init__(message)


class UnknownModelError(InvalidRequestError):
    """``model=`` names neither a model group of the tenant or router nor a model its
    providers serve. ``groups`` and ``models`` are the names that would have been accepted."""

    def __init__(self, name: str, groups: Sequence[str], models: Sequence[str]) -> None:
        self.name = name if len(name) <= 64 else f"{name[:16]}…"
        self.groups = tuple(groups)
        self.models = tuple(models)
        super().__init__(
            f"unknown model or model group {self.name!r} (groups: "
            f"{', '.join(self.groups) or 'none'}; models: {', '.join(self.models) or 'none'})",
            parameter="model",
        )


class RouterClosedError(GatewayError):
    """The router is closing or closed: it accepts no new request."""

    outcome = "router_closed"


class NoProviderAvailableError(GatewayError):
    """The tenant's chain is empty: no provider has a usable key, model and healthy state.

    ``reasons`` maps each provider that was considered to why it was left out.
    """

    outcome = "no_provider"

    def __init__(self, tenant_id: object, reasons: dict[str, str]) -> None:
        self.tenant_id = str(tenant_id)
        self.reasons = dict(reasons)
        detail = "; ".join(f"{p}: {r}" for p, r in self.reasons.items()) or "no provider configured"
        super().__init__(f"no usable provider for tenant {self.tenant_id} ({detail})")


# --- provider attempts ---------------------------------------------------------------------


class ProviderError(GatewayError):
    """One attempt against one provider failed.

    ``retryable`` says whether another provider may succeed where this one failed.
    ``status`` is the value written to ``model_usage_stats.status``.
    """

    retryable: bool = True
    status: str = "error"
    outcome = "provider_error"  # reaches the caller when final: another would fail alike

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        model: str | None = None,
        status_code: int | None = None,
    ) -> None:
        self.provider = provider
        self.model = model
        self.status_code = status_code
        self.message = message
        # Every attempt of the request, filled in when the router gives up with this error.
        self.attempts: tuple[Attempt, ...] = ()
        code = f" HTTP {status_code}" if status_code is not None else ""
        super().__init__(f"{provider}{code}: {message}")


class ProviderConnectionError(ProviderError):
    """The connection failed or was dropped before a complete response."""


class ProviderTimeoutError(ProviderError):
    """The provider did not answer in time."""

    status = "timeout"


class RateLimitError(ProviderError):
    """HTTP 429. ``retry_after`` is the provider's advised wait in seconds, if it gave one."""

    status = "rate_limit"

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        model: str | None = None,
        status_code: int | None = 429,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, provider=provider, model=model, status_code=status_code)
        self.retry_after = retry_after


class ServerError(ProviderError):
    """HTTP 5xx, 408 or 409: the provider failed, another may not."""


class MalformedResponseError(ProviderError):
    """A 2xx response whose body is empty, not JSON, or has no usable choice."""


class EmptyResponseError(ProviderError):
    """A 2xx answer with no content (empty or whitespace), no tool calls and no completion
    tokens (zero or unreported), completed or streamed. Overloaded free-tier models answer
    this way; another provider may not. Not raised for a request with ``max_tokens: 0``.
    """

    status = "empty_response"


class AuthenticationError(ProviderError):
    """HTTP 401/403: this key is bad. Another provider (another key) may still work."""

    status = "auth_error"


class MidStreamError(ProviderError):
    """A stream failed after content had reached the caller; it is not failed over.

    ``partial_content`` is what the caller already received.
    """

    def __init__(
        self, message: str, *, provider: str, model: str | None, partial_content: str, cause: str
    ) -> None:
        super().__init__(message, provider=provider, model=model)
        self.partial_content = partial_content
        self.cause = cause


class BadRequestError(ProviderError):
    """HTTP 400/404/422: the request itself is wrong; another provider would reject it too."""

    retryable = False


class ContextWindowExceededError(BadRequestError):
    """A 400 saying the request does not fit the model's context window.

    Final like any 400 in a tenant's usual chain; within a model group the router moves on to
    the next entry with a larger window. ``limit`` is the window the provider stated, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        model: str | None = None,
        status_code: int | None = 400,
        limit: int | None = None,
    ) -> None:
        super().__init__(message, provider=provider, model=model, status_code=status_code)
        self.limit = limit


# --- the request as a whole ----------------------------------------------------------------


class AllProvidersFailedError(GatewayError):
    """Every attempt of a request failed. ``attempts`` lists them in order."""

    outcome = "all_failed"

    def __init__(self, tenant_id: object, attempts: Sequence[Attempt]) -> None:
        self.tenant_id = str(tenant_id)
        self.attempts = tuple(attempts)
        tried = ", ".join(f"{a.provider}/{a.model}: {a.error_class}" for a in self.attempts)
        super().__init__(f"all providers failed for tenant {self.tenant_id} [{tried}]")

    @property
    def last_error(self) -> str | None:
        return self.attempts[-1].error_message if self.attempts else None

    @property
    def rate_limited(self) -> bool:
        """Every attempt was refused with a 429: the caller should slow down, not give up."""
        return bool(self.attempts) and all(a.outcome == "rate_limit" for a in self.attempts)

    @property
    def retry_after(self) -> float | None:
        """The shortest wait a provider advised (seconds), if any advised one."""
        waits = [a.retry_after for a in self.attempts if a.retry_after is not None]
        return min(waits) if waits else None


class DeadlineExceededError(AllProvidersFailedError):
    """The request's total deadline ran out before any provider answered."""

    outcome = "deadline_exceeded"

    def __init__(self, tenant_id: object, attempts: Sequence[Attempt], timeout: float) -> None:
        self.timeout = timeout
        super().__init__(tenant_id, attempts)
        self.args = (
            f"deadline of {timeout:g}s exceeded for tenant {self.tenant_id} "
            f"after {len(self.attempts)} attempt(s)",
        )


# --- virtual keys (the gateway server's credentials) ---------------------------------------


class VirtualKeyError(GatewayError):
    """A virtual key is refused. ``reason``: unknown, revoked, expired or malformed.

    The message never contains the key (nor its hash); ``key_id`` is set when the key exists.
    """

    REASONS = ("unknown", "revoked", "expired", "malformed")

    def __init__(self, reason: str, key_id: object = None) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown virtual key refusal reason {reason!r}")
        self.reason = reason
        self.key_id = None if key_id is None else str(key_id)
        suffix = f" (key {self.key_id})" if self.key_id is not None else ""
        super().__init__(f"virtual key refused: {reason}{suffix}")


class VirtualKeySpecError(ConfigError, ValueError):
    """What a new virtual key would grant is invalid. ``field`` names the offending value."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid virtual key {field}: {reason}")
