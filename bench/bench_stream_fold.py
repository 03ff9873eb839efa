"""What folding a stream costs per event: content chunks, tool-call deltas, the empty check.

Run (no database, no network)::

    python bench/bench_stream_fold.py

Prints, for each measure, the median, min and max over 5 repeats of µs per event:

- ``StreamProgress.apply`` on a content chunk;
- ``StreamProgress.apply`` on a tool-call delta (8 argument characters) for a call whose
  arguments arrive in 1,000, 10,000 and 50,000 pieces, including assembling ``tool_calls()``
  at the end: a flat figure means folding is linear in the arguments' length;
- ``empty_answer`` on an ordinary answer (the check every completion pays).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from llm_gateway.providers.response import empty_answer
from llm_gateway.providers.sse import StreamProgress

REPEATS = 5
_HEAD = {
    "choices": [
        {
            "delta": {
                "tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": ""}}]
            }
        }
    ]
}
_DELTA = {
    "choices": [
        {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "abcdefgh"}}]}}
    ]
}
_CONTENT = {"id": "x", "model": "m", "choices": [{"index": 0, "delta": {"content": "hello"}}]}


def _tool_deltas(n: int) -> float:
    progress = StreamProgress("m")
    progress.apply(_HEAD, "p")
    start = time.perf_counter()
    for _ in range(n):
        progress.apply(_DELTA, "p")
    calls = progress.tool_calls()
    elapsed = time.perf_counter() - start
    assert calls is not None and len(calls[0]["function"]["arguments"]) == 8 * n
    return elapsed / n * 1e6


def _content(n: int) -> float:
    progress = StreamProgress("m")
    start = time.perf_counter()
    for _ in range(n):
        progress.apply(_CONTENT, "p")
    return (time.perf_counter() - start) / n * 1e6


def _empty_check(n: int) -> float:
    params = {"temperature": 0.2, "max_tokens": 256}
    start = time.perf_counter()
    for _ in range(n):
        empty_answer("hello there", None, 12, params, "p", "m")
    return (time.perf_counter() - start) / n * 1e6


def _report(label: str, measure: Callable[[int], float], n: int) -> None:
    runs = [measure(n) for _ in range(REPEATS)]
    print(
        f"{label:<34} median {statistics.median(runs):7.3f}  "
        f"min {min(runs):7.3f}  max {max(runs):7.3f}  µs/event"
    )


def main() -> None:
    _report("apply: content chunk", _content, 50_000)
    for n in (1_000, 10_000, 50_000):
        _report(f"apply: tool delta, {n:,} pieces", _tool_deltas, n)
    _report("empty_answer: ordinary answer", _empty_check, 200_000)


if __name__ == "__main__":
    main()
