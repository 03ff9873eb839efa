"""What every provider family shares: settings and the call itself (parsing: :mod:`.response`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.cookiejar import Cookie, CookieJar, DefaultCookiePolicy
from typing import Any, Literal

import orjson

from ..errors import GatewayError, InvalidRequestError, MalformedResponseError, ProviderError
from ..keys import ApiKey
from .errors import classify
from .response import ProviderResponse as ProviderResponse
from .response import empty_answer as empty_answer
from .response import parse_completion as parse_completion


def _jsonable(value: object) -> object:
    """orjson fallback for SDK types passed as params (pydantic models: tools, formats)."""
    dump = getattr(value, "model_dump", None)
    if dump is None:
        raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
    return dump(mode="json")


def _dumps(body: Mapping[str, Any]) -> bytes:
    return orjson.dumps(body, default=_jsonable)


Family = Literal["openai", "groq"]

# Placeholder the SDK clients are built with: the real key of each request is sent per request,
# so a bug that forgot it fails with a 401 instead of leaking another tenant's key.
NO_KEY = "llm-gateway-no-key"


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """How to reach one provider. ``api_key`` is the system key (``None``: tenants' keys only)."""

    name: str
    family: Family
    base_url: str
    default_model: str
    api_key: ApiKey | None = None
    # Whether requests need a key at all (a local server usually does not).
    requires_key: bool = True
    max_connections: int = 100
    # As many idle connections as active ones: a smaller pool reconnects (TLS) under load.
    max_keepalive: int = 100
    connect_timeout: float = 5.0
    models: Mapping[str, int] = field(default_factory=dict)  # model -> context window (tokens)


@dataclass(frozen=True, slots=True)
class _Defaults:
    family: Family
    base_url: str
    default_model: str
    key_env: str
    url_env: str
    requires_key: bool = True


_DEFAULTS: dict[str, _Defaults] = {
    "groq": _Defaults(
        "groq", "https://api.groq.com", "llama-3.3-70b-versatile", "GROQ_API_KEY", "GROQ_BASE_URL"
    ),
    "openrouter": _Defaults(
        "openai",
        "https://openrouter.ai/api/v1",
        "deepseek/deepseek-r1",
        "OPENROUTER_API_KEY",
        "OPENROUTER_BASE_URL",
    ),
    "llm7": _Defaults(
        "openai", "https://api.llm7.io/v1", "gpt-4o-mini", "LLM7_API_KEY", "LLM7_BASE_URL"
    ),
    "openai": _Defaults(
        "openai", "https://api.openai.com/v1", "gpt-4o-mini", "OPENAI_API_KEY", "OPENAI_BASE_URL"
    ),
    "local": _Defaults(
        "openai", "", "default", "LOCAL_LLM_API_KEY", "LOCAL_LLM_BASE_URL", requires_key=False
    ),
}

# Context windows of the default and commonly configured models; unknown models are not
# excluded for size, only scored without the context-fit term.
CONTEXT_WINDOWS: dict[str, dict[str, int]] = {
    "groq": {
        "llama-3.3-70b-versatile": 131_072,
        "llama-3.1-70b-versatile": 131_072,
        "llama-3.1-8b-instant": 131_072,
        "mixtral-8x7b-32768": 32_768,
    },
    "openrouter": {
        "deepseek/deepseek-r1": 163_840,
        "anthropic/claude-3.5-sonnet": 200_000,
        "google/gemini-pro-1.5": 2_000_000,
    },
    "llm7": {"gpt-4o-mini": 128_000, "gpt-4o": 128_000, "gpt-4-turbo": 128_000},
    "openai": {"gpt-4o-mini": 128_000, "gpt-4o": 128_000},
    "local": {},
}


def settings_from_env(env: Mapping[str, str] | None = None) -> dict[str, ProviderSettings]:
    """Provider settings from the usual environment variables.

    ``local`` is included only when ``LOCAL_LLM_BASE_URL`` is set (``LOCAL_LLM_MODEL`` names
    its model). Every other provider is always included; it has a system key only when its
    ``*_API_KEY`` variable is set.
    """
    env = os.environ if env is None else env
    found: dict[str, ProviderSettings] = {}
    for name, d in _DEFAULTS.items():
        base_url = env.get(d.url_env) or d.base_url
        if not base_url:
            continue
        model = env.get("LOCAL_LLM_MODEL", d.default_model) if name == "local" else d.default_model
        key = (env.get(d.key_env) or "").strip() or None  # a blank variable is no key
        found[name] = ProviderSettings(
            name=name,
            family=d.family,
            base_url=base_url.rstrip("/"),
            default_model=model,
            api_key=ApiKey(key, "system") if key else None,
            requires_key=d.requires_key,
            models=CONTEXT_WINDOWS.get(name, {}),
        )
    return found


def provider_settings(
    name: str, base_url: str, *, api_key: str | None = None, **options: Any
) -> ProviderSettings:
    """Settings for a known provider pointed at ``base_url`` (tests, proxies, self-hosting)."""
    d = _DEFAULTS[name]
    params: dict[str, Any] = {
        "family": d.family,
        "default_model": d.default_model,
        "requires_key": d.requires_key,
        "models": CONTEXT_WINDOWS.get(name, {}),
    }
    params.update(options)
    return ProviderSettings(
        name=name,
        base_url=base_url.rstrip("/"),
        api_key=ApiKey(api_key, "system") if api_key else None,
        **params,
    )


class Provider:
    """One provider's SDK client, shared by every request and tenant of a router.

    The SDK client owns one pooled HTTP client; the tenant's key travels in each request's
    ``Authorization`` header, so keys never create clients or pools. SDK retries are off:
    the router owns retries and failover.
    """

    def __init__(
        self, settings: ProviderSettings, client: Any, *, path: str, response_type: type
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._client = client
        # Non-streamed calls use the SDK's own low-level POST with a body serialised by orjson:
        # same transport, auth and error classes as ``create()``, without its per-request
        # parameter transformation (about a fifth of a request's CPU; see bench/README.md).
        self._post = client.post
        self._path = path
        self._response_type = response_type
        self._stream = client.chat.completions.with_streaming_response.create
        # The Timeout class of the HTTP library this SDK runs on (httpx or httpx2).
        self._timeout = type(client.timeout)

    async def complete(
        self,
        *,
        key: ApiKey | None,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        timeout: float,
        extra_headers: Mapping[str, str] | None = None,
    ) -> ProviderResponse:
        """Send one non-streamed request; ``timeout`` bounds the whole call.

        Connecting is bounded by ``connect_timeout`` as well (a float would set every phase).
        ``extra_headers``: sent too (trace context); they never replace the key's.

        Raises:
            InvalidRequestError: the body cannot be serialised (nothing was sent).
            ProviderError: the provider failed (classified).
        """
        try:
            body = _dumps({"model": model, "messages": messages, **params})
        except TypeError as exc:
            raise InvalidRequestError(f"request is not JSON-serialisable: {exc}") from None
        headers = {"Content-Type": "application/json"}
        if extra_headers:  # trace context (traceparent); set first, never over auth
            headers.update(extra_headers)
        if key is not None:
            headers["Authorization"] = f"Bearer {key.reveal()}"
        try:
            response = await self._post(
                self._path,
                cast_to=self._response_type,
                content=body,
                options={
                    "headers": headers,
                    "timeout": self._timeout(
                        timeout, connect=min(self.settings.connect_timeout, timeout)
                    ),
                },
            )
            content = response.content
        except Exception as exc:
            error = classify(exc, self.name, model, key)
        else:
            parsed = parse_completion(self.name, model, content, response.headers)
            empty = empty_answer(
                parsed.content,
                parsed.tool_calls,
                parsed.output_tokens,
                params,
                self.name,
                parsed.model,
            )
            if empty is None:
                return parsed
            error = empty
        # Raised outside the except block: the SDK exception holds the request, whose headers
        # hold the key, and must not ride along as __context__.
        raise error

    async def open_stream(
        self,
        *,
        key: ApiKey | None,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        timeout: float,
        chunk_timeout: float,
        extra_headers: Mapping[str, str] | None = None,
    ) -> ProviderStream:
        """Send a streaming request; returns once the response headers arrived (2xx).

        ``timeout`` bounds the opening (connect, sending, a free pooled connection; the caller
        bounds the time to the first token); ``chunk_timeout`` bounds each network read for
        the stream's whole life, however late in the deadline it was opened. The returned
        stream must be closed.

        Raises:
            InvalidRequestError: the SDK refused the parameters (nothing was sent).
            ProviderError: the provider failed (classified).
        """
        headers = {"Authorization": f"Bearer {key.reveal()}"} if key is not None else None
        if extra_headers:  # trace context (traceparent); never over auth
            headers = {**extra_headers, **(headers or {})}
        options = dict(params)
        if self.settings.family == "openai":
            # Groq always reports usage (x_groq.usage) and its SDK has no stream_options.
            stream_options = dict(options.pop("stream_options", None) or {})
            stream_options.setdefault("include_usage", True)
            options["stream_options"] = stream_options
        limits = self._timeout(
            chunk_timeout,
            connect=min(self.settings.connect_timeout, timeout),
            write=timeout,
            pool=timeout,
        )
        error: GatewayError
        try:
            manager = self._stream(
                model=model,
                messages=messages,
                stream=True,
                extra_headers=headers,
                timeout=limits,
                **options,
            )
            response = await manager.__aenter__()
        except TypeError as exc:
            # An unknown or unserialisable parameter: the request was never built.
            error = InvalidRequestError(f"invalid request parameters: {exc}")
        except Exception as exc:
            error = classify(exc, self.name, model, key)
        else:
            return ProviderStream(self.name, model, manager, response, key)
        raise error

    async def aclose(self) -> None:
        await self._client.close()


class RefusingCookieJar(CookieJar):
    """A cookie jar that never stores a cookie, so never sends one.

    A provider's HTTP client is shared by every tenant: a ``Set-Cookie`` on one tenant's
    response (Cloudflare sets them in front of real providers) would otherwise ride along on
    the next tenant's request. Storing is refused twice over: the methods that store are
    no-ops, and the policy allows no domain (in case a future httpx calls something else).
    """

    def __init__(self) -> None:
        super().__init__(DefaultCookiePolicy(allowed_domains=[]))

    def set_cookie(self, cookie: Cookie) -> None:
        return None

    def set_cookie_if_ok(self, cookie: Cookie, request: Any) -> None:
        return None

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


def build_provider(settings: ProviderSettings, sdk_class: Any, http: Any, path: str) -> Provider:
    """One SDK client with its own pooled HTTP client (``http`` is the httpx module it uses;
    ``path`` is the chat-completions path under the base URL).

    Made once per provider per router: the pool lives as long as the router, whatever the
    number of tenants and keys.
    """
    http_client = http.AsyncClient(
        limits=http.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_keepalive,
        ),
        timeout=http.Timeout(60.0, connect=settings.connect_timeout),
        cookies=RefusingCookieJar(),
    )
    client = sdk_class(
        api_key=NO_KEY, base_url=settings.base_url, max_retries=0, http_client=http_client
    )
    return Provider(settings, client, path=path, response_type=http.Response)


class ProviderStream:
    """An open streaming response. ``events()`` yields parsed chunks; always ``aclose()``."""

    def __init__(
        self, provider: str, model: str, manager: Any, response: Any, key: ApiKey | None
    ) -> None:
        self.provider = provider
        self.model = model
        self._manager = manager
        self._response = response
        self._key = key
        self.headers: Mapping[str, str] = response.headers
        content_type = self.headers.get("content-type", "")
        self._is_sse = "text/event-stream" in content_type

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Parsed chunks; SDK and transport errors come out as the gateway's typed errors."""
        from .sse import iter_events

        if not self._is_sse:
            raise MalformedResponseError(
                f"expected an event stream, got {self.headers.get('content-type')!r}",
                provider=self.provider,
                model=self.model,
            )
        iterator = iter_events(self._response.iter_lines(), self.provider, self.model)
        while True:
            try:
                event = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except ProviderError:
                raise
            except Exception as exc:
                error = classify(exc, self.provider, self.model, self._key)
            else:
                yield event
                continue
            raise error

    async def aclose(self) -> None:
        """Release the connection to the pool (idempotent, safe in any state)."""
        with contextlib.suppress(Exception):
            await self._manager.__aexit__(None, None, None)
