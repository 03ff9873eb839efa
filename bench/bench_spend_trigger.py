"""Cost of the governance spend trigger on usage writes: COPY batches with it on and off.

Run (PostgreSQL through ``DATABASE_URL``, default the local server)::

    python bench/bench_spend_trigger.py [--tenants 100] [--users 50] [--repeats 4]

Creates a database, applies the migrations, then alternates the trigger on/off over 5,000-row
binary COPY batches (the writer's fresh-batch path) and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_gateway.migrate import apply_migrations

COLUMNS = [
    "id", "tenant_id", "user_id", "provider", "model_name", "latency_ms",
    "estimated_cost_usd", "status", "timestamp", "key_source",
]  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    admin_dsn = args.dsn or "postgresql://postgres@127.0.0.1:5432/postgres"
    admin = await asyncpg.connect(admin_dsn)
    db = f"llmgw_bench_trigger_{os.getpid()}"
    await admin.execute(f'CREATE DATABASE "{db}"')
    dsn = admin_dsn.rpartition("/")[0] + "/" + db
    try:
        await apply_migrations(dsn)
        conn = await asyncpg.connect(dsn)
        tenants = [uuid.uuid4() for _ in range(args.tenants)]
        now = datetime.now(UTC)

        def batch(n: int) -> list[tuple[Any, ...]]:
            return [
                (
                    uuid.uuid4(),
                    random.choice(tenants),
                    f"u{random.randint(1, args.users)}",
                    "groq",
                    "m",
                    5,
                    Decimal("0.000123"),
                    "success",
                    now - timedelta(seconds=random.random() * 60),
                    random.choice(["tenant", "system"]),
                )
                for _ in range(n)
            ]

        times: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(args.repeats):
            for mode in ("on", "off"):
                action = "ENABLE" if mode == "on" else "DISABLE"
                await conn.execute(
                    f"ALTER TABLE model_usage_stats {action} TRIGGER llm_gateway_count_spend"
                )
                for _ in range(4):
                    rows = batch(5000)
                    t0 = time.perf_counter()
                    await conn.copy_records_to_table(
                        "model_usage_stats", records=rows, columns=COLUMNS
                    )
                    times[mode].append(time.perf_counter() - t0)
        for mode, values in times.items():
            print(
                f"trigger {mode:3}: median {statistics.median(values) * 1000:6.1f} ms per"
                f" 5,000-row COPY (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f},"
                f" n={len(values)})"
            )
        print(
            f"ratio on/off: {statistics.median(times['on']) / statistics.median(times['off']):.2f}"
        )
        await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=4)
    asyncio.run(main(parser.parse_args()))
