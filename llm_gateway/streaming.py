"""Streamed completions: failover until the first content chunk, typed errors after it.

The router reads ahead on each provider of the chain until a chunk with content (text that
is not only whitespace, or a tool call) arrives; only then is the stream handed to the
caller, the chunks read ahead first. A stream that ends before that is an empty answer
(:class:`EmptyResponseError`, failed over) unless it spent completion tokens or the request
asked for none, the same rule as for completions. A failure after that raises
:class:`MidStreamError` with what was received; it is never silently switched to another
provider. Every ending writes one usage row: success, error, timeout or cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from .chain import ChainEntry
from .errors import MalformedResponseError, MidStreamError, ProviderError, ProviderTimeoutError
from .health import HealthRegistry, KeyHealth
from .ledger import RequestLedger
from .providers import Provider
from .providers.base import ProviderStream
from .providers.response import empty_answer
from .providers.sse import StreamChunk, StreamProgress
from .types import CompletionResult

__all__ = ["CompletionStream", "StreamChunk"]

# Strong references to closes scheduled from __del__, so they are not garbage-collected.
_closing: set[asyncio.Task[None]] = set()

_FAILED_ROW: Mapping[str, Any] = {"extra": {"stream": True}}
# The request's outcome (metrics, traces) when the stream that reached the caller ends.
_REQUEST_OUTCOME = {"success": "success", "cancelled": "cancelled"}


class CompletionStream:
    """An async iterator of :class:`StreamChunk`; use ``async with`` or call :meth:`aclose`.

    Made by :meth:`TenantLLMRouter.stream_for_tenant`, which returns it only once a provider
    has produced content. :attr:`result` holds the :class:`CompletionResult` after the end.
    Its opening is an attempt kind of :func:`~llm_gateway.attempts.run_attempts`: the router's
    one attempt loop fails over, checks breakers and writes the rows of failed openings.
    """

    what = "first token"

    def __init__(
        self,
        *,
        providers: Mapping[str, Provider],
        health: HealthRegistry,
        ledger: RequestLedger,
        messages: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        started: float,
        ttft_timeout: float,
        chunk_timeout: float,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self._providers = providers
        self._health = health
        self._ledger = ledger
        self._messages = messages
        self._params = params
        self._started = started
        self.cap: float | None = ttft_timeout
        self._chunk_timeout = chunk_timeout
        self._on_done = on_done
        self._entry: ChainEntry | None = None
        self._state: KeyHealth | None = None
        self._stream: ProviderStream | None = None
        self._events: AsyncIterator[dict[str, Any]] | None = None
        self._progress: StreamProgress | None = None
        self._pending: deque[StreamChunk] = deque()
        self._attempt_started = 0.0
        self._ttft = 0.0
        self._done = False
        self.result: CompletionResult | None = None

    # --- opening: one attempt of the router's attempt loop ----------------------------------

    def begin(self, entry: ChainEntry) -> None:
        self._progress = StreamProgress(entry.model)
        self._stream = None
        self._events = None

    async def run(self, entry: ChainEntry, timeout: float) -> deque[StreamChunk]:
        """Open a stream on ``entry`` and read it up to its first content chunk.

        Returns the chunks read so far (whitespace before the content is kept), or every
        chunk of a stream that ended without content but is no empty answer.
        """
        progress = self._progress
        assert progress is not None
        obs = self._ledger.obs
        # ``timeout`` bounds the opening; each later read gets the whole chunk_timeout.
        self._stream = stream = await self._providers[entry.provider].open_stream(
            key=entry.key,
            model=entry.model,
            messages=self._messages,
            params=self._params,
            timeout=timeout,
            chunk_timeout=self._chunk_timeout,
            extra_headers=None if obs is None else obs.attempt_started(entry),
        )
        self._events = events = stream.events()
        read: deque[StreamChunk] = deque()
        async for event in events:
            chunk = progress.apply(event, entry.provider)
            if chunk is not None:
                read.append(chunk)
                if progress.substantive:
                    return read
        # The stream ended before any content: usage (sent last) says if it is empty.
        empty = empty_answer(
            progress.content,
            progress.tool_calls(),
            progress.output_tokens,
            self._params,
            entry.provider,
            progress.model,
        )
        if empty is not None:
            raise empty
        if progress.finish_reason is None:
            raise MalformedResponseError(
                "stream ended without a finish reason", provider=entry.provider, model=entry.model
            )
        return read

    def row(self, cancelled: bool) -> Mapping[str, Any]:
        if not cancelled:
            return _FAILED_ROW
        progress = self._progress
        assert progress is not None
        inp, out, estimated = progress.tokens(self._messages)
        return {
            "model": progress.model,
            "input_tokens": inp,
            "output_tokens": out,
            "extra": {"stream": True, "tokens_estimated": estimated},
        }

    async def release(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()

    def succeed(
        self, entry: ChainEntry, state: KeyHealth, first: deque[StreamChunk], started: float
    ) -> CompletionStream:
        self._entry, self._state, self._pending = entry, state, first
        self._attempt_started = started
        self._ttft = time.monotonic() - started
        if self._ledger.obs is not None:
            self._ledger.obs.first_token(entry, self._ttft)
        return self

    # --- iteration -------------------------------------------------------------------------

    @property
    def request_id(self) -> uuid.UUID:
        """The request's id: its usage rows and its :attr:`result` carry it."""
        return self._ledger.request_id

    def __aiter__(self) -> CompletionStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._pending:
            return self._pending.popleft()
        if self._done:
            raise StopAsyncIteration
        assert self._events is not None and self._progress is not None and self._entry is not None
        progress, entry = self._progress, self._entry
        try:
            async with asyncio.timeout(self._chunk_timeout):
                while True:
                    chunk = progress.apply(await anext(self._events), entry.provider)
                    if chunk is not None:
                        return chunk
        except StopAsyncIteration:
            pass
        except ProviderError as exc:
            await self._fail(exc)
        except TimeoutError:
            await self._fail(
                ProviderTimeoutError(
                    f"no chunk within {self._chunk_timeout:g}s",
                    provider=entry.provider,
                    model=progress.model,
                )
            )
        except asyncio.CancelledError:
            await self._end("cancelled", None)
            raise
        except Exception as bug:
            # A defect of ours: the row and the probe first, then let it surface.
            await self._end("error", None, f"unexpected {type(bug).__name__}")
            raise
        if progress.finish_reason is None:
            await self._fail(
                MalformedResponseError(
                    "stream ended without a finish reason",
                    provider=entry.provider,
                    model=progress.model,
                )
            )
        await self._end("success", None)
        raise StopAsyncIteration

    async def _fail(self, error: ProviderError) -> None:
        await self._end(error.status, error)
        progress, entry = self._progress, self._entry
        assert progress is not None and entry is not None
        raise MidStreamError(
            f"stream failed after content reached the caller: {error}",
            provider=entry.provider,
            model=progress.model,
            partial_content=progress.content,
            cause=type(error).__name__,
        ) from None

    async def _end(
        self, outcome: str, error: ProviderError | None, message: str | None = None
    ) -> None:
        """Write the attempt's usage row, then release the connection (once)."""
        if self._done:
            return
        self._account(outcome, error, message)
        if self._stream is not None:
            await self._stream.aclose()

    def _account(
        self, outcome: str, error: ProviderError | None, message: str | None = None
    ) -> None:
        """Health, usage row and result of the attempt that reached the caller. No I/O."""
        self._done = True
        if self._on_done is not None:
            self._on_done()
        entry, state, progress = self._entry, self._state, self._progress
        assert entry is not None and state is not None and progress is not None
        latency = time.monotonic() - self._attempt_started
        if outcome == "success":
            self._health.on_success(
                state, self._ttft, self._stream.headers if self._stream else None
            )
        elif error is not None:
            self._health.on_failure(state, error)
        else:
            self._health.on_cancel(state)
        inp, out, estimated = progress.tokens(self._messages)
        extra: dict[str, Any] = {
            "stream": True,
            "ttft_ms": round(self._ttft * 1000),
            "chunks": progress.chunks,
        }
        if estimated:
            extra["tokens_estimated"] = True
        if progress.finish_reason:
            extra["finish_reason"] = progress.finish_reason
        cancelled = (
            asyncio.CancelledError("cancelled by the caller") if outcome == "cancelled" else None
        )
        _, cost = self._ledger.record(
            entry,
            outcome,
            latency,
            model=progress.model,
            input_tokens=inp,
            output_tokens=out,
            cached_tokens=progress.cached_tokens,
            reasoning_tokens=progress.reasoning_tokens,
            error=error or cancelled,
            message=message,
            extra=extra,
        )
        if outcome == "success":
            self.result = CompletionResult(
                content=progress.content,
                provider=entry.provider,
                model=progress.model,
                tokens_input=inp,
                tokens_output=out,
                cost=cost,
                latency=time.monotonic() - self._started,
                finish_reason=progress.finish_reason,
                tool_calls=progress.tool_calls(),
                attempts=tuple(self._ledger.attempts),
                request_id=self._ledger.request_id,
                requested_model=entry.model,
                key_source=entry.key_source,
            )
        if self._ledger.obs is not None:
            ending = _REQUEST_OUTCOME.get(outcome, "mid_stream_error")
            self._ledger.obs.ended(self.result, error or cancelled, ending)

    # --- closing ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the stream; if it had not finished, its usage row says ``cancelled``."""
        if not self._done and self._entry is not None:
            await self._end("cancelled", None)

    def _abandon(self) -> None:
        """Record a still-open stream as cancelled (router shutdown); no I/O."""
        if not self._done and self._entry is not None:
            self._account("cancelled", None)

    async def __aenter__(self) -> CompletionStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped without aclose(): still write the row and free the connection.
        if self._done or self._entry is None:
            return
        warnings.warn(
            "CompletionStream was not closed; use `async with`", ResourceWarning, stacklevel=1
        )
        self._account("cancelled", None)
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(RuntimeError):  # no loop: the transport closes with it
                task = asyncio.get_running_loop().create_task(stream.aclose())
                _closing.add(task)
                task.add_done_callback(_closing.discard)
