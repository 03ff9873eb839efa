"""Applies the numbered SQL migrations under ``sql/migrations`` and records them."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

from .dsn import CONNECT_TIMEOUT, DatabaseConnectError, connect_checked
from .errors import DatabaseError

__all__ = ["Migration", "apply_migrations", "load_migrations", "sql_dir"]

_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")
# One fixed advisory-lock key, so two instances starting at once apply migrations in turn.
_LOCK_KEY = 0x4C4C4D_4757  # "LLMGW"

_TABLE = """
CREATE TABLE IF NOT EXISTS llm_gateway_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


_TENANT_ID_TYPE = """
SELECT format_type(atttypid, atttypmod) FROM pg_attribute
WHERE attrelid = to_regclass('tenants') AND attname = 'id' AND NOT attisdropped
"""


async def _check_tenant_id(conn: asyncpg.Connection) -> None:
    """Refuse an adopted ``tenants`` table whose ``id`` is not a uuid.

    Every lookup binds a UUID, so such a table would make each request fail with
    TenantNotFoundError while the migration itself reported success.
    """
    found = await conn.fetchval(_TENANT_ID_TYPE)
    if found != "uuid":
        what = f"its id column is {found}" if found else "it has no id column"
        raise DatabaseError(
            f"cannot adopt the existing tenants table: {what}, and the gateway needs uuid"
            " (tenant ids are UUIDs); convert the column or use a uuid key"
        )


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]


def sql_dir() -> Path:
    """The ``sql/`` folder: shipped inside the wheel, or the repository's in a source checkout."""
    shipped = Path(str(resources.files("llm_gateway"))) / "_sql"
    if shipped.is_dir():
        return shipped
    return Path(__file__).resolve().parent.parent / "sql"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    folder = directory or sql_dir() / "migrations"
    found: list[Migration] = []
    for path in sorted(folder.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file {path.name!r} is not named NNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {folder}")
    return found


async def apply_migrations(
    dsn: str,
    *,
    directory: Path | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    check: str = "DATABASE_URL",
) -> list[int]:
    """Apply every migration not yet recorded in ``llm_gateway_migrations``.

    Each migration runs in its own transaction under an advisory lock. Returns the versions
    applied by this call (empty when the schema is current). Connecting is bounded by
    ``connect_timeout``; a bad DSN raises :class:`~llm_gateway.dsn.InvalidDsnError`, a failed
    connect :class:`~llm_gateway.dsn.DatabaseConnectError` naming the cause and ``check``.
    """
    migrations = load_migrations(directory)
    try:
        conn = await connect_checked(dsn, connect_timeout, check=check)
    except DatabaseConnectError as exc:
        raise DatabaseConnectError(
            f"cannot connect to PostgreSQL to migrate: {exc}", kind=exc.kind, target=exc.target
        ) from exc
    applied: list[int] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(_TABLE)
            done = {
                r["version"] for r in await conn.fetch("SELECT version FROM llm_gateway_migrations")
            }
            if 1 in done:
                await _check_tenant_id(conn)  # adopted by an earlier version without the check
            for migration in migrations:
                if migration.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    if migration.version == 1:
                        # Inside the transaction: a refused adoption leaves the table as it was.
                        await _check_tenant_id(conn)
                    await conn.execute(
                        "INSERT INTO llm_gateway_migrations (version, name, checksum)"
                        " VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )
                applied.append(migration.version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"migration failed: {exc}") from exc
    finally:
        await conn.close()
    return applied
