"""PostgreSQL DSNs: validation, credential masking, and a bounded connect with a classified error.

Every place that shows a DSN shows :func:`mask_dsn` of it. Every connect of the CLI and the
router goes through :func:`connect_checked` (or :func:`create_pool_checked`): it never waits
longer than :data:`CONNECT_TIMEOUT` by default, and its :class:`DatabaseConnectError` says what
went wrong (unreachable, authentication failed, database missing, timeout) and what to check.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

from usage.tracker import DEFAULT_DSN

from .errors import ConfigError, DatabaseError

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_DSN",
    "ConnectFailure",
    "DatabaseConnectError",
    "InvalidDsnError",
    "connect_checked",
    "create_pool_checked",
    "dsn_source",
    "mask_dsn",
    "validate_dsn",
    "with_database",
]

#: Default bound, in seconds, on establishing one connection (TCP, TLS, authentication).
CONNECT_TIMEOUT = 5.0

ConnectFailure = Literal["unreachable", "timeout", "authentication", "database_missing", "refused"]

_SCHEMES = ("postgresql", "postgres")
# user:password@ in anything that looks like a URL, and password=... in a query or libpq string.
_USERINFO_PASSWORD = re.compile(r"(//[^/?#@:]*):([^/?#@]*)@")
_PARAM_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)([^&\s]*)")


class InvalidDsnError(ConfigError, ValueError):
    """A DSN that is not a ``postgresql://`` URL asyncpg can use. The message is masked."""


class DatabaseConnectError(DatabaseError):
    """Connecting to PostgreSQL failed. ``kind`` classifies why; ``target`` is the masked DSN."""

    def __init__(self, message: str, *, kind: ConnectFailure, target: str) -> None:
        self.kind: ConnectFailure = kind
        self.target = target
        super().__init__(message)


def mask_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***`` (works on malformed DSNs too)."""

    def userinfo(match: re.Match[str]) -> str:
        return f"{match[1]}:***@" if match[2] else match[0]

    def param(match: re.Match[str]) -> str:
        return f"{match[1]}***" if match[2] else match[0]

    return _PARAM_PASSWORD.sub(param, _USERINFO_PASSWORD.sub(userinfo, dsn))


def _check_port(text: str, masked: str) -> None:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidDsnError(f"invalid DSN {masked!r}: port {text!r} is not a number in 1-65535")


def validate_dsn(dsn: str, *, check: str | None = None) -> str:
    """Return ``dsn`` if it is a usable ``postgresql://`` URL, else raise :class:`InvalidDsnError`.

    Checks what asyncpg would otherwise report with its own exception types, or only at the
    first connect: the scheme, every host's port (multi-host ``h1:5432,h2:5433`` included) and
    ``port=`` in the query. The error message never contains the password; ``check`` (where
    the DSN came from, e.g. ``--dsn``) is named in it.
    """
    try:
        return _validate(dsn)
    except InvalidDsnError as exc:
        if check is None:
            raise
        raise InvalidDsnError(f"{exc}; check {check}") from None


def dsn_source(explicit: str | None, flag: str = "--dsn") -> tuple[str, str]:
    """The DSN to use (``explicit``, else ``DATABASE_URL``, else the default) and what a user
    should check when it fails: ``flag``, ``DATABASE_URL``, or that it is unset."""
    if explicit:
        return explicit, flag
    env = os.environ.get("DATABASE_URL")
    if env:
        return env, "DATABASE_URL"
    return DEFAULT_DSN, f"DATABASE_URL (unset, so the default {DEFAULT_DSN} was used)"


def _validate(dsn: str) -> str:
    if not dsn.strip():
        raise InvalidDsnError("empty DSN: expected postgresql://user:password@host:5432/database")
    masked = mask_dsn(dsn)
    try:
        parts = urlsplit(dsn)
    except ValueError as exc:
        raise InvalidDsnError(f"invalid DSN {masked!r}: {exc}") from None
    if parts.scheme not in _SCHEMES:
        got = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise InvalidDsnError(
            f"invalid DSN {masked!r}: {got}; expected postgresql://user:password@host:5432/database"
        )
    hosts = parts.netloc.rpartition("@")[2]
    for host in hosts.split(",") if hosts else ():
        if host.startswith("["):
            end = host.find("]")
            if end < 0:
                raise InvalidDsnError(f"invalid DSN {masked!r}: unclosed '[' in host {host!r}")
            rest = host[end + 1 :]
            if rest and not rest.startswith(":"):
                raise InvalidDsnError(f"invalid DSN {masked!r}: junk after IPv6 host {host!r}")
            port = rest[1:]
        else:
            port = host.partition(":")[2]
        if port:
            _check_port(port, masked)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "port":
            for one in value.split(","):
                _check_port(one, masked)
    return dsn


def with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at ``database`` instead (``dbname``/``database`` query keys dropped)."""
    parts = urlsplit(validate_dsn(dsn))
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k
        not in {
            "dbname",
            "database",
        }
    ]
    return urlunsplit(parts._replace(path=f"/{database}", query=urlencode(query, safe="/")))


def _user_and_db(dsn: str) -> tuple[str, str]:
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    user = unquote(parts.username or "") or query.get("user", "") or "(default user)"
    database = unquote(parts.path.lstrip("/")) or query.get("dbname", "") or user
    return user, database


def _classify(exc: BaseException, dsn: str, timeout: float, check: str) -> DatabaseConnectError:
    """The one-line error for a failed connect: what failed, the cause, what to check."""
    target = mask_dsn(dsn)
    user, database = _user_and_db(dsn)
    cause = str(exc).strip() or type(exc).__name__
    kind: ConnectFailure
    if isinstance(exc, TimeoutError):
        kind = "timeout"
        message = (
            f"PostgreSQL at {target} did not complete the connection within {timeout:g} s"
            f" (something accepts connections there but does not answer as PostgreSQL);"
            f" check {check}"
        )
    elif isinstance(exc, asyncpg.InvalidCatalogNameError):
        kind = "database_missing"
        message = (
            f"PostgreSQL at {target}: database {database!r} does not exist;"
            f" create it or name an existing database in {check}"
        )
    elif isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        kind = "authentication"
        message = (
            f"PostgreSQL at {target}: authentication failed for user {user!r} ({cause});"
            f" set the user and password in {check}"
        )
    elif isinstance(exc, OSError):
        kind = "unreachable"
        message = f"no PostgreSQL reachable at {target} ({cause}); start it or check {check}"
    else:
        kind = "refused"
        message = f"PostgreSQL at {target} refused the connection ({cause}); check {check}"
    return DatabaseConnectError(message, kind=kind, target=target)


# What connecting can raise besides the classified cases: asyncpg's own DSN/parameter errors.
# ClientConfigurationError is asyncpg >= 0.28; older versions raise ValueError for bad DSNs.
_CONFIG_ERRORS = (
    getattr(asyncpg, "ClientConfigurationError", ValueError),
    ValueError,
    OverflowError,
)


async def connect_checked(
    dsn: str,
    timeout: float = CONNECT_TIMEOUT,
    *,
    check: str = "DATABASE_URL",
    **kwargs: Any,
) -> asyncpg.Connection:
    """``asyncpg.connect(dsn)``, bounded by ``timeout`` seconds, with a classified error.

    Raises :class:`InvalidDsnError` for a malformed DSN and :class:`DatabaseConnectError`
    (``kind``: unreachable, timeout, authentication, database_missing, refused) otherwise.
    ``check`` names where the DSN came from (``DATABASE_URL``, ``--dsn``...) for the message.
    """
    validate_dsn(dsn, check=check)
    try:
        # asyncpg's timeout bounds the whole exchange (TCP, TLS, startup, authentication),
        # shared across the hosts of a multi-host DSN; its default is 60 s.
        return await asyncpg.connect(dsn, timeout=timeout, **kwargs)
    except _CONFIG_ERRORS as exc:
        raise InvalidDsnError(f"invalid DSN {mask_dsn(dsn)!r}: {exc}; check {check}") from None
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise _classify(exc, dsn, timeout, check) from exc


async def create_pool_checked(
    dsn: str,
    timeout: float = CONNECT_TIMEOUT,
    *,
    check: str = "DATABASE_URL",
    **kwargs: Any,
) -> asyncpg.Pool:
    """``asyncpg.create_pool(dsn, ...)`` with each connect bounded and errors as in
    :func:`connect_checked`."""
    validate_dsn(dsn, check=check)
    try:
        return await asyncpg.create_pool(dsn, timeout=timeout, **kwargs)
    except _CONFIG_ERRORS as exc:
        raise InvalidDsnError(f"invalid DSN {mask_dsn(dsn)!r}: {exc}; check {check}") from None
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise _classify(exc, dsn, timeout, check) from exc
