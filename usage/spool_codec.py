"""Rows <-> spool lines: one usage row as one JSON object keyed by :data:`COLUMNS`.

uuids, decimals and timestamps are strings; :func:`encode_row` never fails, whatever was
queued, and :func:`decode_row` checks every type, so a line a replay accepts is a valid row.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from .record import COLUMNS, UsageRecord

__all__ = ["decode_row", "dumps", "encode_row", "loads"]

try:
    import orjson

    _OPTS = orjson.OPT_NON_STR_KEYS

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, default=str, option=_OPTS)

    loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is optional

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, default=str, separators=(",", ":")).encode()

    loads = json.loads


def encode_row(rec: UsageRecord, extra: dict[str, Any] | None = None) -> bytes:
    """One row as a JSON line (with trailing newline). Never fails, whatever was queued.

    Something that is not a usage row becomes ``{"_unrecognized": repr}``: replay reports it
    as a corrupt line and keeps it in ``rejected/``, instead of blocking the writer.
    """
    try:
        obj = dict(zip(COLUMNS, rec.as_tuple(), strict=True))
    except Exception:
        obj = {"_unrecognized": repr(rec)[:2000]}
    if extra:
        obj.update(extra)
    try:
        return dumps(obj) + b"\n"
    except (TypeError, ValueError):  # e.g. a self-referencing metadata dict
        obj["metadata"] = {"_unencodable": repr(rec.metadata)[:500]}
        return dumps(obj) + b"\n"


def _uuid(v: Any) -> uuid.UUID:
    if not isinstance(v, str):
        raise TypeError("uuid must be a string")
    return uuid.UUID(v)


def _opt_uuid(v: Any) -> uuid.UUID | None:
    return None if v is None else _uuid(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError("expected an integer")
    return v


def _opt_int(v: Any) -> int | None:
    return None if v is None else _int(v)


def _opt_dec(v: Any) -> Decimal | None:
    if v is None:
        return None
    if not isinstance(v, str | int):
        raise TypeError("decimal must be a string")
    try:
        return Decimal(v)
    except InvalidOperation as exc:
        raise ValueError("bad decimal") from exc


def _opt_tags(v: Any) -> list[str] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise TypeError("tags must be a list of strings")
    return v


def decode_row(o: Any) -> UsageRecord:
    """The inverse of :func:`encode_row`; raises ``ValueError``/``TypeError``/``KeyError``."""
    if not isinstance(o, dict):
        raise TypeError("row is not an object")
    meta = o["metadata"]  # any JSON value: PostgreSQL took it as jsonb, so must the replay
    known = o["price_known"]
    if not isinstance(known, bool):
        raise TypeError("price_known must be a boolean")
    return UsageRecord(
        id=_uuid(o["id"]),
        tenant_id=_uuid(o["tenant_id"]),
        user_id=_opt_str(o["user_id"]),
        provider=_str(o["provider"]),
        model_name=_str(o["model_name"]),
        endpoint=_str(o["endpoint"]),
        input_tokens=_opt_int(o["input_tokens"]),
        output_tokens=_opt_int(o["output_tokens"]),
        latency_ms=_int(o["latency_ms"]),
        estimated_cost_usd=_opt_dec(o["estimated_cost_usd"]),
        status=_str(o["status"]),
        error_message=_opt_str(o["error_message"]),
        metadata=meta,
        timestamp=datetime.fromisoformat(_str(o["timestamp"])),
        request_id=_opt_uuid(o["request_id"]),
        requested_model=_opt_str(o["requested_model"]),
        attempt=_int(o["attempt"]),
        key_source=_opt_str(o["key_source"]),
        input_price_per_m=_opt_dec(o["input_price_per_m"]),
        output_price_per_m=_opt_dec(o["output_price_per_m"]),
        price_known=known,
        # Absent in spool files written before sessions and tags existed.
        session_id=_opt_str(o.get("session_id")),
        tags=_opt_tags(o.get("tags")),
        virtual_key_id=_opt_str(o.get("virtual_key_id")),  # absent before migration 011
    )
