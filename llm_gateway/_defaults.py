"""Constants that light modules (the command line) need without importing the router."""

from __future__ import annotations

from usage.tracker import DEFAULT_DSN  # the one definition; ``usage`` imports no SDK

__all__ = ["DEFAULT_DSN"]
