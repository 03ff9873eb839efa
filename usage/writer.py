"""Bulk write paths into ``model_usage_stats`` and the writer's error policy.

Measured on the reference machine (2 cores, PostgreSQL 15, table with its indexes, batches of
5,000 rows; ``bench/bench_usage_writer.py`` prints the current figures):

* plain binary ``COPY`` into the table: about 70,000 rows/s. Not idempotent by itself: a row
  already present fails the whole batch with ``unique_violation`` (and writes nothing).
* ``COPY`` into a temporary staging table, then ``INSERT ... SELECT ... ON CONFLICT DO
  NOTHING``: about 50,000 rows/s. Idempotent.
* ``INSERT ... SELECT FROM unnest($1::uuid[], ...) ON CONFLICT DO NOTHING``: about 30,000
  rows/s, and twice the client CPU. Idempotent.

So the writer sends a fresh batch with plain ``COPY`` (its ids have never been sent, so a
conflict is impossible unless a caller queued a row twice), and anything that may already be
in the table -- a retried batch whose commit may have landed, a spool replay, a batch that hit
``unique_violation`` -- through the staging upsert. Either way a row lands exactly once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

import asyncpg

from .record import COLUMNS, UsageRecord

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    PoolConn = PoolConnectionProxy[asyncpg.Record]
    Conn = PoolConn | asyncpg.Connection[asyncpg.Record]

__all__ = [
    "TABLE",
    "ErrorKind",
    "classify_error",
    "copy_rows",
    "describe_error",
    "reset_codecs",
    "set_codecs",
    "unnest_upsert_rows",
    "upsert_rows",
]

TABLE: Final = "model_usage_stats"
STAGE: Final = "llm_gateway_usage_stage"
_COLS: Final = ", ".join(f'"{c}"' for c in COLUMNS)

_CREATE_STAGE: Final = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE} ON COMMIT DELETE ROWS AS"
    f" SELECT {_COLS} FROM {TABLE} WITH NO DATA"
)
_UPSERT_FROM_STAGE: Final = (
    f"INSERT INTO {TABLE} ({_COLS}) SELECT {_COLS} FROM {STAGE}"
    ' ON CONFLICT (id, "timestamp") DO NOTHING'
)
# tags (text[]) travel as array literals: unnest() of a 2-D array would flatten it.
_PG_TYPES: Final = (
    "uuid", "uuid", "text", "text", "text", "text", "int4", "int4", "int4", "numeric", "text",
    "text", "jsonb", "timestamptz", "uuid", "text", "int2", "text", "numeric", "numeric", "bool",
    "text", "text", "text",
)  # fmt: skip
_TAGS_AT: Final = COLUMNS.index("tags")
_UNNEST_UPSERT: Final = (
    f"INSERT INTO {TABLE} ({_COLS}) SELECT "
    + ", ".join(f"u{i}::text[]" if i == _TAGS_AT else f"u{i}" for i in range(len(COLUMNS)))
    + " FROM unnest("
    + ", ".join(f"${i}::{t}[]" for i, t in enumerate(_PG_TYPES, start=1))
    + ") AS u("
    + ", ".join(f"u{i}" for i in range(len(COLUMNS)))
    + ') ON CONFLICT (id, "timestamp") DO NOTHING'
)

# --- JSONB codec ---------------------------------------------------------------------------
# Binary format, because COPY is binary: a version byte (1) then the JSON text.
try:
    import orjson

    _ORJSON_OPTS = orjson.OPT_NON_STR_KEYS

    def _jsonb_encode(value: Any) -> bytes:
        return b"\x01" + orjson.dumps(value, default=str, option=_ORJSON_OPTS)

    def _jsonb_decode(data: bytes) -> Any:
        return orjson.loads(data[1:])

except ImportError:  # pragma: no cover - orjson is optional

    def _jsonb_encode(value: Any) -> bytes:
        return b"\x01" + json.dumps(value, default=str, separators=(",", ":")).encode()

    def _jsonb_decode(data: bytes) -> Any:
        return json.loads(data[1:])


async def set_codecs(conn: Conn) -> None:
    """Encode/decode ``jsonb`` with orjson (``json`` without it) on ``conn``."""
    await conn.set_type_codec(
        "jsonb",
        encoder=_jsonb_encode,
        decoder=_jsonb_decode,
        schema="pg_catalog",
        format="binary",
    )


async def reset_codecs(conn: Conn) -> None:
    """Undo :func:`set_codecs` before a borrowed connection goes back to its pool."""
    await conn.reset_type_codec("jsonb", schema="pg_catalog")


# --- write paths ---------------------------------------------------------------------------


def _tuples(rows: Sequence[UsageRecord]) -> list[tuple[Any, ...]]:
    return [r.as_tuple() for r in rows]


async def copy_rows(conn: Conn, rows: Sequence[UsageRecord], *, timeout: float | None) -> int:
    """Plain binary COPY in one implicit transaction. Raises on any existing id."""
    await conn.copy_records_to_table(TABLE, records=_tuples(rows), columns=COLUMNS, timeout=timeout)
    return len(rows)


async def upsert_rows(conn: Conn, rows: Sequence[UsageRecord], *, timeout: float | None) -> int:
    """Idempotent write (COPY to a temp table, then INSERT ... ON CONFLICT DO NOTHING).

    Returns how many rows were new; the others were already in the table.
    """
    await conn.execute(_CREATE_STAGE, timeout=timeout)  # per session; a no-op after the first
    async with conn.transaction():
        await conn.copy_records_to_table(
            STAGE, records=_tuples(rows), columns=COLUMNS, timeout=timeout
        )
        status = await conn.execute(_UPSERT_FROM_STAGE, timeout=timeout)
    return int(status.rsplit(" ", 1)[-1])


async def unnest_upsert_rows(
    conn: Conn, rows: Sequence[UsageRecord], *, timeout: float | None
) -> int:
    """Idempotent write with one ``INSERT ... SELECT FROM unnest(...)`` (kept for the bench)."""
    columns: list[Any] = list(zip(*_tuples(rows), strict=True)) if rows else [()] * len(COLUMNS)
    columns[_TAGS_AT] = [_array_literal(t) for t in columns[_TAGS_AT]]
    status = await conn.execute(_UNNEST_UPSERT, *columns, timeout=timeout)
    return int(status.rsplit(" ", 1)[-1])


def _array_literal(tags: Sequence[str] | None) -> str | None:
    if tags is None:
        return None
    quoted = ('"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"' for t in tags)
    return "{" + ",".join(quoted) + "}"


async def drop_stage(conn: Conn) -> None:
    """Remove the staging table from a borrowed connection."""
    await conn.execute(f"DROP TABLE IF EXISTS pg_temp.{STAGE}")


# --- error policy --------------------------------------------------------------------------

ErrorKind = Literal["transient", "duplicate", "poison"]

_POISON_TYPES: Final[tuple[type[BaseException], ...]] = (
    asyncpg.DataError,  # SQLSTATE class 22: a value PostgreSQL refuses
    asyncpg.IntegrityConstraintViolationError,  # class 23 (NOT NULL, CHECK); unique handled first
    ValueError,  # client-side encoding (asyncpg's client DataError is a ValueError)
    TypeError,
    OverflowError,
    AttributeError,  # something that is not a UsageRecord was queued
)


def classify_error(exc: BaseException) -> ErrorKind:
    """What a failed write means for its batch.

    ``duplicate``: some ids are already stored (use the idempotent path). ``poison``: a row
    PostgreSQL will never take (isolate it). ``transient``: anything else -- connection loss,
    timeouts, shutdowns, a missing table -- retry the batch later, then spool it.
    """
    if isinstance(exc, asyncpg.UniqueViolationError):
        return "duplicate"
    if isinstance(exc, _POISON_TYPES):
        return "poison"
    return "transient"


_CREDENTIALS = re.compile(r"(\w+://)[^@/\s]+@")
_PASSWORD = re.compile(r"(password\s*[=:]\s*)\S+", re.IGNORECASE)


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: message``, shortened, with any DSN credentials or password masked."""
    text = f"{type(exc).__name__}: {exc}"
    text = _CREDENTIALS.sub(r"\1***@", text)
    text = _PASSWORD.sub(r"\1***", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
