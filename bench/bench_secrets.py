"""What encrypted tenant keys cost: per config load (decryption) and per request (none).

How to run (from the repository root; admin DSN as for the other scripts)::

    python bench/bench_secrets.py                  # ~20 s
    python bench/bench_secrets.py --hits 200000 --repeats 7

Parts:

1. ``router._store.get(tenant)`` on a cached config, for a tenant whose keys are plaintext and
   one whose keys are ``enc:v1`` values (three providers each): the cached path must cost the
   same, since keys are decrypted once per load. ns per call, median over the repeats (the
   two tenants interleaved within each repeat), with min..max.
2. ``parse_tenant_config`` of the same two rows (what one config load does besides the
   query): µs per call, so the cost of decrypting three keys per load is visible.

Database ``llmgw_bench_secrets`` is created, migrated, and dropped at the end. Prints figures,
asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import statistics
import sys
import time
import uuid

import _common
import asyncpg

from llm_gateway import TenantLLMRouter, provider_settings
from llm_gateway.config import parse_tenant_config
from llm_gateway.migrate import apply_migrations
from llm_gateway.secrets import KeyRing

PROVIDERS = ("groq", "openrouter", "openai")
RING = f"k1:{base64.b64encode(bytes(range(32))).decode()}"


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f}  ({min(values):.1f}..{max(values):.1f})"


async def main(args: argparse.Namespace) -> None:
    print(_common.environment(["cryptography", "cachetools"]))
    logging.getLogger("llm_gateway").setLevel(logging.ERROR)  # the plaintext tenant's warning
    ring = KeyRing.parse(RING)
    plain_id, enc_id = uuid.uuid4(), uuid.uuid4()
    plain = {p: f"key-{p}-{'x' * 40}" for p in PROVIDERS}
    sealed = {p: ring.encrypt(enc_id, p, v) for p, v in plain.items()}
    async with _common.scratch_database(args.dsn, "llmgw_bench_secrets") as dsn:
        await apply_migrations(dsn)
        conn = await asyncpg.connect(dsn)
        for tid, tokens in ((plain_id, plain), (enc_id, sealed)):
            await conn.execute(
                "INSERT INTO tenants (id, name, llm_tokens) VALUES ($1, 'b', $2::jsonb)",
                tid,
                json.dumps(tokens),
            )
        await conn.close()
        providers = {p: provider_settings(p, "http://127.0.0.1:9/v1") for p in PROVIDERS}
        async with TenantLLMRouter(
            dsn, providers=providers, keyring=ring, record_usage=False
        ) as router:
            store = router._store
            for tid in (plain_id, enc_id):
                await store.get(tid)  # cached from here on
            loads = store.loads
            cached: dict[str, list[float]] = {"plaintext keys": [], "enc:v1 keys": []}
            slice_hits = max(args.hits // 10, 1)
            for _ in range(args.repeats):
                spent = dict.fromkeys(cached, 0)
                for _ in range(10):  # slices, alternating, so load drift hits both alike
                    for label, tid in (("plaintext keys", plain_id), ("enc:v1 keys", enc_id)):
                        start = time.perf_counter_ns()
                        for _ in range(slice_hits):
                            await store.get(tid)
                        spent[label] += time.perf_counter_ns() - start
                for label, ns in spent.items():
                    cached[label].append(ns / (slice_hits * 10))
            assert store.loads == loads, "a timed call reloaded the config"

    print(f"\n1. cached router._store.get(), ns per call, {args.hits} calls x {args.repeats}")
    for label, values in cached.items():
        print(f"   {label:15} {_spread(values)}")

    parse: dict[str, list[float]] = {"plaintext keys": [], "enc:v1 keys": []}
    rows = {
        "plaintext keys": (plain_id, json.dumps(plain)),
        "enc:v1 keys": (enc_id, json.dumps(sealed)),
    }
    n = max(args.hits // 20, 1)
    quiet = KeyRing.parse(RING)
    quiet.warn_plaintext(plain_id, PROVIDERS)  # warned (silenced) before timing: no log call
    for _ in range(args.repeats):
        for label, (tid, text) in rows.items():
            start = time.perf_counter_ns()
            for _ in range(n):
                parse_tenant_config(tid, text, "{}", keyring=quiet)
            parse[label].append((time.perf_counter_ns() - start) / n / 1000)
    print(f"\n2. parse_tenant_config (one load), µs per call, {n} calls x {args.repeats}")
    for label, values in parse.items():
        print(f"   {label:15} {_spread(values)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=_common.DEFAULT_ADMIN_DSN)
    parser.add_argument("--hits", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
    sys.exit(0)
