"""Usage row ids: UUIDv7 (RFC 9562), time-ordered.

A time-ordered id keeps inserts into the ``(id, "timestamp")`` primary key at the right edge
of the B-tree instead of scattering them over the whole index, which matters once the index no
longer fits in memory. 74 random bits per millisecond make collisions negligible.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable

__all__ = ["new_usage_id"]

_RAND_B = (1 << 62) - 1

# A private generator seeded from the OS: unaffected by an application's random.seed(), about
# 1 µs cheaper per id than os.urandom, and reseeded in forked children so that two workers of
# one parent never draw the same bits.
_random = random.Random(os.urandom(32))
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(32)))


def _uuid_from_int_checked(value: int) -> uuid.UUID:
    return uuid.UUID(int=value)


_UUID = uuid.UUID
_UNKNOWN = uuid.SafeUUID.unknown
_new = object.__new__
_set = object.__setattr__


def _uuid_from_int_fast(value: int) -> uuid.UUID:
    # uuid.UUID(int=...) validates in Python (~1 µs); ours are valid by construction.
    u: uuid.UUID = _new(_UUID)
    _set(u, "int", value)
    _set(u, "is_safe", _UNKNOWN)
    return u


def _pick_constructor() -> Callable[[int], uuid.UUID]:
    probe = 0x01A2_0887_14C7_755C_94E7_E90C_17FB_3F7A
    try:
        if _uuid_from_int_fast(probe) == uuid.UUID(int=probe) and str(
            _uuid_from_int_fast(probe)
        ) == str(uuid.UUID(int=probe)):
            return _uuid_from_int_fast
    except (AttributeError, TypeError):  # pragma: no cover - a future UUID layout
        pass
    return _uuid_from_int_checked  # pragma: no cover


_from_int = _pick_constructor()


def new_usage_id() -> uuid.UUID:
    """A new UUIDv7 for a usage row; make it before the row is queued."""
    ms = time.time_ns() // 1_000_000
    rand = _random.getrandbits(74)
    value = (
        (ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76  # version
        | (rand >> 62) << 64  # rand_a: 12 bits
        | 0b10 << 62  # variant
        | (rand & _RAND_B)  # rand_b: 62 bits
    )
    return _from_int(value)
