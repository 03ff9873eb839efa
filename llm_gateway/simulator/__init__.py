"""A simulated OpenAI-compatible provider: a real loopback HTTP server for tests and demos.

>>> async with SimulatedProvider(name="a") as sim:          # doctest: +SKIP
...     client = openai.AsyncOpenAI(api_key="k", base_url=sim.base_url)
...     sim.script("429", "ok")   # next request rate-limited, the one after answers

Behaviour names (``fail_with=``, :meth:`SimulatedProvider.script`) are listed in
:data:`BEHAVIOURS`; see :mod:`.behaviour`. From a shell: ``llm-gateway simulate`` (also
``python -m llm_gateway.simulator``; ``--help`` lists the options).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal

from .behaviour import BEHAVIOURS, STREAM_ONLY_BEHAVIOURS, Behaviour, LatencyDistribution
from .server import RecordedRequest, SimulatedProvider

__all__ = [
    "BEHAVIOURS",
    "STREAM_ONLY_BEHAVIOURS",
    "Behaviour",
    "LatencyDistribution",
    "RecordedRequest",
    "SimulatedProvider",
    "run_simulator",
]


def run_simulator(
    port: int,
    *,
    latency_ms: float = 0.0,
    fail_rate: float = 0.0,
    fail_with: str | None = None,
    host: str = "127.0.0.1",
    name: str = "sim",
    retry_after: float | None = 1.0,
    model: str | None = None,
    seed: int | None = None,
    flavor: str = "openai",
) -> None:
    """Serve a :class:`SimulatedProvider` until SIGINT/SIGTERM (blocking; for the CLI).

    Prints the base URL (``http://HOST:PORT/v1``) on its own line on stdout once listening.
    Raises :class:`ValueError` for an argument out of range (before listening) and
    :class:`OSError` when the address cannot be bound (e.g. the port is in use).
    """
    _check_options(port, latency_ms=latency_ms, retry_after=retry_after)
    sim = SimulatedProvider(
        name=name,
        host=host,
        port=port,
        latency_ms=latency_ms,
        fail_rate=fail_rate,
        fail_with=fail_with,
        retry_after=retry_after,
        model=model,
        seed=seed,
        flavor=flavor,
        record_requests=False,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_until_signalled(sim, port))


def _check_options(port: int, *, latency_ms: float, retry_after: float | None) -> None:
    """What :class:`SimulatedProvider` leaves to its caller (it checks fail_rate/fail_with)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be within 0..65535, not {port}")
    if not (math.isfinite(latency_ms) and latency_ms >= 0):
        raise ValueError(f"latency_ms must be a finite number >= 0, not {latency_ms}")
    if retry_after is not None and not (math.isfinite(retry_after) and retry_after >= 0):
        raise ValueError(f"retry_after must be a finite number >= 0 or None, not {retry_after}")


async def _listen(sim: SimulatedProvider, port: int) -> None:
    """Start ``sim``; a failure to bind says where (the CLI prints it as one line)."""
    try:
        await sim.start()
    except OSError as exc:  # port in use, address not available, unknown host
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror
        raise OSError(exc.errno, f"cannot listen on {sim.host}:{port}: {reason or exc}") from exc


async def _serve_until_signalled(sim: SimulatedProvider, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows / not main thread
            pass
    try:
        await _listen(sim, port)
        try:
            print(sim.base_url, flush=True)
            await stop.wait()
        finally:
            await sim.close()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
