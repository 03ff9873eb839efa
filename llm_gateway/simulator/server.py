"""A tiny HTTP/1.1 server on :func:`asyncio.start_server` speaking the OpenAI chat API.

Keep-alive, ``Content-Length`` (or chunked) request bodies, JSON responses with
``Content-Length`` and streamed responses as chunked ``text/event-stream``. It is built to be
cheap per request: no pydantic, one ``write`` per non-streamed answer, orjson when present.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

from ._http import (
    TERMINATOR,
    BadRequest,
    Headers,
    RawRequest,
    encode_head,
    frame,
    read_request,
    send,
    send_error,
    until_eof,
)
from .answer import Answer
from .behaviour import (
    DEFAULT,
    DEFAULT_MODEL,
    HTML_BODY,
    MALFORMED_BODY,
    STATUS_BEHAVIOURS,
    STREAM_ONLY_BEHAVIOURS,
    Behaviour,
    LatencyDistribution,
    as_behaviour,
    dumps,
    error_body,
    loads,
)

__all__ = ["RecordedRequest", "SimulatedProvider"]

_OK: Final = as_behaviour("ok")
_FAIL_DEFAULT: Final = as_behaviour("500")


def _seconds(value: float) -> str:
    """``Retry-After`` value: ``"1"`` for whole seconds, else e.g. ``"2.5"``."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


@dataclass(slots=True)
class RecordedRequest:
    """One HTTP request received by a :class:`SimulatedProvider`."""

    method: str
    path: str
    """Request path without the query string, e.g. ``/v1/chat/completions``."""
    api_key: str | None
    """The token of an ``Authorization: Bearer <token>`` header."""
    model: str | None
    stream: bool
    body: dict[str, Any] | None
    """Parsed JSON body (``None`` when absent or not a JSON object)."""
    headers: dict[str, str]
    """Request headers with lower-cased names."""
    received_at: float
    """:func:`time.monotonic` when the request head was read."""
    behaviour: str | None = field(default=None)
    """For chat requests, the behaviour chosen (before stream-only ones fall back to "ok")."""


class SimulatedProvider:
    """A real loopback HTTP server impersonating an OpenAI-compatible chat provider.

    Use it as ``async with SimulatedProvider(name="a") as sim:`` and point an SDK at
    :attr:`base_url`. The defaults (``latency_ms``, ``fail_rate``, ``fail_with``,
    ``retry_after``, ``model``, ``flavor``, ``chunks``, ``chunk_delay_ms``) are plain attributes
    that may be changed at any time; :meth:`script` overrides them for the next requests.
    """

    def __init__(
        self,
        *,
        name: str = "sim",
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 0.0,
        fail_rate: float = 0.0,
        fail_with: str | Behaviour | None = None,
        retry_after: float | None = 1.0,
        model: str | None = None,
        seed: int | None = None,
        flavor: str = "openai",
        chunks: int = 4,
        chunk_delay_ms: float = 0.0,
        record_requests: bool = True,
        rate_limit_requests: int = 10_000,
        rate_limit_tokens: int = 1_000_000,
        latency_dist: LatencyDistribution | None = None,
    ) -> None:
        """Configure the simulator; nothing listens until :meth:`start`.

        ``fail_with`` is the failure behaviour applied with probability ``fail_rate`` (drawn
        from ``random.Random(seed)``); with ``fail_rate == 0`` and ``fail_with`` set, every
        chat request fails that way; with ``fail_rate > 0`` and no ``fail_with``, failures are
        "500". ``flavor="groq"`` reports streamed usage in the final chunk's ``x_groq.usage``.
        ``record_requests=False`` keeps :attr:`requests` empty (for long benchmarks).
        ``latency_dist`` draws each answer's delay instead of ``latency_ms`` (a behaviour's own
        ``latency_ms`` still wins), from its own ``random.Random(seed)``.
        """
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError("fail_rate must be within [0, 1]")
        if flavor not in ("openai", "groq"):
            raise ValueError("flavor must be 'openai' or 'groq'")
        if fail_with is not None:
            as_behaviour(fail_with)  # validate early
        self.name = name
        self.host = host
        self.latency_ms = latency_ms
        self.fail_rate = fail_rate
        self.fail_with: str | Behaviour | None = fail_with
        self.retry_after = retry_after
        self.model = model
        self.flavor = flavor
        self.chunks = chunks
        self.chunk_delay_ms = chunk_delay_ms
        self.record_requests = record_requests
        self.rate_limit_requests = rate_limit_requests
        self.rate_limit_tokens = rate_limit_tokens
        self.connections_accepted = 0
        """TCP connections accepted so far (a client that reuses connections keeps it low)."""
        self.key_behaviours: dict[str, str | Behaviour] = {}
        """Per API key: every chat request carrying that key behaves like this (e.g. "401")."""
        self.requests: list[RecordedRequest] = []
        """Every request received, in order."""
        self._requested_port = port
        self._port = port
        self._rng = random.Random(seed)
        self.latency_dist = latency_dist
        self._latency_rng = random.Random(seed)
        self._script: deque[Behaviour] = deque()
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._closing = False
        self._seq = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening (``port=0`` picks a free port, see :attr:`port`)."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._closing = False
        self._server = await asyncio.start_server(self._serve, self.host, self._requested_port)
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and close every open connection (hanging ones too); idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True
        server.close()
        await asyncio.sleep(0)  # let connections accepted just now see ``_closing``
        tasks = list(self._conns)
        for task, writer in list(self._conns.items()):
            writer.transport.abort()
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- introspection and control -------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port (the real one once started)."""
        return self._port

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, ``http://HOST:PORT/v1`` (the groq SDK wants :attr:`root_url`)."""
        return f"{self.root_url}/v1"

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT`` (groq SDK ``base_url``; it appends ``/openai/v1``)."""
        return f"http://{self.host}:{self._port}"

    @property
    def open_connections(self) -> int:
        """Client connections currently open (idle keep-alive ones included)."""
        return len(self._conns)

    def keys_seen(self) -> list[str]:
        """API keys (``Authorization: Bearer X``) of the chat requests received, in order."""
        return [
            r.api_key
            for r in self.requests
            if r.api_key is not None and r.method == "POST" and r.path.endswith("/chat/completions")
        ]

    def script(self, *behaviours: str | Behaviour) -> None:
        """Make the next chat requests behave like ``behaviours``, in order (then defaults)."""
        self._script.extend(as_behaviour(b) for b in behaviours)

    def reset(self) -> None:
        """Forget the recorded requests and any pending script."""
        self.requests.clear()
        self._script.clear()

    def _choose(self, api_key: str | None = None) -> Behaviour:
        if api_key is not None and api_key in self.key_behaviours:
            return as_behaviour(self.key_behaviours[api_key])
        if self._script:
            return self._script.popleft()
        fail_with, rate = self.fail_with, self.fail_rate
        if fail_with is None and rate <= 0.0:
            return _OK
        failure = _FAIL_DEFAULT if fail_with is None else as_behaviour(fail_with)
        if rate <= 0.0 or self._rng.random() < rate:
            return failure
        return _OK

    # -- HTTP plumbing -------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closing or task is None:
            writer.transport.abort()
            return
        self._conns[task] = writer
        self.connections_accepted += 1
        try:
            while await self._handle_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            # Client went away, or close() cancelled us: ending quietly is the point.
            pass
        finally:
            del self._conns[task]
            writer.close()

    async def _handle_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; return whether the connection stays open."""
        try:
            raw = await read_request(reader)
        except BadRequest as exc:
            await send_error(writer, exc.status, exc.message, False)
            return False
        if raw is None:
            return False
        rec, body = self._record(raw)
        method, path, keep = rec.method, rec.path, raw.keep_alive
        if method == "POST" and path.endswith("/chat/completions"):
            if body is None:
                await send_error(writer, 400, "We could not parse the JSON body.", keep)
                return keep
            return await self._chat(rec, body, reader, writer, keep)
        if method == "GET" and path.endswith("/models"):
            model = self.model or DEFAULT_MODEL
            data = {"id": model, "object": "model", "created": 0, "owned_by": self.name}
            await send(writer, 200, dumps({"object": "list", "data": [data]}), keep)
            return keep
        await send_error(writer, 404, f"Unknown request URL: {method} {path}", keep)
        return keep

    def _record(self, raw: RawRequest) -> tuple[RecordedRequest, dict[str, Any] | None]:
        body: dict[str, Any] | None = None
        if raw.body:
            with contextlib.suppress(ValueError):
                parsed = loads(raw.body)
                body = parsed if isinstance(parsed, dict) else None
        auth = raw.headers.get("authorization", "")
        model = body.get("model") if body is not None else None
        rec = RecordedRequest(
            method=raw.method,
            path=raw.target.split("?", 1)[0],
            api_key=auth[7:].strip() if auth[:7].lower() == "bearer " else None,
            model=model if isinstance(model, str) else None,
            stream=body is not None and body.get("stream") is True,
            body=body,
            headers=raw.headers,
            received_at=raw.received_at,
        )
        if self.record_requests:
            self.requests.append(rec)
        return rec, body

    def _ratelimit_headers(self, tokens: int) -> Headers:
        limit = max(1, self.rate_limit_requests)
        return [
            ("x-ratelimit-limit-requests", str(limit)),
            ("x-ratelimit-remaining-requests", str(limit - 1 - (self._seq - 1) % limit)),
            ("x-ratelimit-reset-requests", "8.64s"),
            ("x-ratelimit-limit-tokens", str(self.rate_limit_tokens)),
            ("x-ratelimit-remaining-tokens", str(max(0, self.rate_limit_tokens - tokens))),
            ("x-ratelimit-reset-tokens", "6ms"),
        ]

    async def _chat(
        self,
        rec: RecordedRequest,
        body: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep: bool,
    ) -> bool:
        beh = self._choose(rec.api_key)
        rec.behaviour = beh.kind
        self._seq += 1
        latency = beh.latency_ms
        if latency is None:
            dist = self.latency_dist
            latency = self.latency_ms if dist is None else dist.sample(self._latency_rng)
        if latency > 0:
            await asyncio.sleep(latency / 1000)
        kind = beh.kind
        if kind in STREAM_ONLY_BEHAVIOURS and not rec.stream:
            kind = "ok"
        extra: Headers = [("x-request-id", f"req_{self.name}_{self._seq}")]
        if beh.headers:
            extra.extend(beh.headers.items())

        if kind == "drop":
            return False
        if kind == "hang":
            await until_eof(reader)
            return False
        if kind in STATUS_BEHAVIOURS:
            status, payload = error_body(kind, beh)
            if kind == "429":
                retry_after = self.retry_after if beh.retry_after is DEFAULT else beh.retry_after
                if retry_after is not None:
                    extra.append(("retry-after", _seconds(retry_after)))
                extra.append(("x-ratelimit-remaining-requests", "0"))
            await send(writer, status, payload, keep, extra=extra)
            return keep
        if kind == "malformed":
            await send(writer, 200, MALFORMED_BODY, keep, extra=extra)
            return keep
        if kind == "empty":
            await send(writer, 200, b"", keep, extra=extra)
            return keep
        if kind == "html":
            await send(writer, 200, HTML_BODY, keep, "text/html; charset=utf-8", extra)
            return keep
        if kind == "raw" and not rec.stream:
            raw = beh.body if isinstance(beh.body, bytes) else dumps(beh.body)
            await send(writer, 200, raw, keep, extra=extra)
            return keep

        answer = Answer.for_request(
            body,
            beh,
            name=self.name,
            model=self.model,
            flavor=self.flavor,
            seq=self._seq,
            created=int(time.time()),
        )
        extra.extend(self._ratelimit_headers(answer.usage["total_tokens"]))
        if not rec.stream:
            payload = answer.completion(empty_choices=kind == "empty_choices")
            await send(writer, 200, payload, keep, extra=extra)
            return keep
        return await self._stream(answer, kind, beh, body, reader, writer, keep, extra)

    async def _stream(
        self,
        answer: Answer,
        kind: str,
        beh: Behaviour,
        body: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        keep: bool,
        extra: Headers,
    ) -> bool:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        pieces = beh.chunks if beh.chunks is not None else self.chunks
        events, stall = answer.stream(kind, beh, pieces=pieces, include_usage=include_usage)
        delay_ms = beh.chunk_delay_ms if beh.chunk_delay_ms is not None else self.chunk_delay_ms
        headers: Headers = [
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache"),
            ("transfer-encoding", "chunked"),
            *extra,
        ]
        if not keep:
            headers.append(("connection", "close"))
        framed = [frame(ev) for ev in events]
        if delay_ms <= 0:
            tail = [] if stall else [TERMINATOR]
            writer.write(b"".join([encode_head(200, headers), *framed, *tail]))
            await writer.drain()
        else:
            writer.write(encode_head(200, headers))
            for i, chunk in enumerate(framed):
                if i:
                    await asyncio.sleep(delay_ms / 1000)
                writer.write(chunk)
                await writer.drain()
            if not stall:
                writer.write(TERMINATOR)
                await writer.drain()
        if stall:
            await until_eof(reader)
            return False
        return keep
