"""Constants that light modules (the command line) need without importing the router."""

from __future__ import annotations

__all__ = ["DEFAULT_DSN"]

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
"""PostgreSQL used when neither a DSN nor ``DATABASE_URL`` is given."""
