"""DSN validation, masking, and the bounded, classified connect of ``db migrate`` and the router."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from llm_gateway import TenantLLMRouter
from llm_gateway.cli import main
from llm_gateway.dsn import (
    CONNECT_TIMEOUT,
    DatabaseConnectError,
    InvalidDsnError,
    connect_checked,
    mask_dsn,
    validate_dsn,
    with_database,
)
from llm_gateway.errors import ConfigError, DatabaseError
from llm_gateway.migrate import apply_migrations

from .conftest import ADMIN_DSN

BAD_DSNS = [
    "not a url",
    "mysql://user:s3cret@127.0.0.1/db",
    "postgresql://user:s3cret@127.0.0.1:abc/db",
    "postgresql://user:s3cret@127.0.0.1:99999/db",
    "postgresql://user:s3cret@[::1/db",
    "postgresql://user:s3cret@h1:5432,h2:x/db",
]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never answers (listen, no accept)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def closed_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def _server_part() -> str:
    """``host:port`` of the test server, to build DSNs with other users and databases."""
    return ADMIN_DSN.split("@", 1)[1].rsplit("/", 1)[0]


# --- masking and validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://u:s3cret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        (
            "postgresql://postgres:@/postgres?host=/tmp/x",
            "postgresql://postgres:@/postgres?host=/tmp/x",
        ),
        ("postgresql://h/db?user=u&password=s3cret", "postgresql://h/db?user=u&password=***"),
        ("mysql://u:s3cret@h:abc/db", "mysql://u:***@h:abc/db"),
        ("host=h password=s3cret user=u", "host=h password=*** user=u"),
        ("postgresql://u:p%40ss@h1:1,h2:2/db", "postgresql://u:***@h1:1,h2:2/db"),
    ],
)
def test_mask_dsn_hides_every_password(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


@pytest.mark.parametrize("dsn", BAD_DSNS)
def test_bad_dsn_is_one_config_error_without_the_password(dsn: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_dsn(dsn, check="--dsn")
    message = str(info.value)
    assert isinstance(info.value, InvalidDsnError)
    assert "\n" not in message and "s3cret" not in message
    assert "check --dsn" in message


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:p@h:5432/db",
        "postgres://h/db",
        "postgresql://u@h1:5432,h2:5433/db",
        "postgresql://[::1]:5432/db",
        "postgresql:///db?host=/var/run/postgresql",
    ],
)
def test_good_dsns_pass_unchanged(dsn: str) -> None:
    assert validate_dsn(dsn) == dsn


def test_with_database_keeps_credentials_host_and_query() -> None:
    got = with_database("postgresql://u:p@h:1/postgres?host=/s&dbname=x", "demo")
    assert got == "postgresql://u:p@h:1/demo?host=/s"


def test_router_rejects_a_bad_dsn_with_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        TenantLLMRouter("not a url", providers={})
    assert "not a url" in str(info.value)


# --- classified, bounded connect -----------------------------------------------------------


async def test_unreachable_server_is_classified(closed_port: int) -> None:
    with pytest.raises(DatabaseConnectError) as info:
        await connect_checked(f"postgresql://u:s3cret@127.0.0.1:{closed_port}/db", check="--dsn")
    assert info.value.kind == "unreachable"
    assert "s3cret" not in str(info.value) and "check --dsn" in str(info.value)


async def test_missing_database_is_classified() -> None:
    name = f"llmgw_absent_{uuid.uuid4().hex[:8]}"
    with pytest.raises(DatabaseConnectError) as info:
        await connect_checked(with_database(ADMIN_DSN, name))
    assert info.value.kind == "database_missing"
    assert name in str(info.value) and "does not exist" in str(info.value)


async def test_unknown_role_is_an_authentication_failure() -> None:
    # The test server trusts loopback, so a wrong password cannot be provoked; an unknown role
    # fails the same authentication step (SQLSTATE 28000).
    dsn = f"postgresql://llmgw_no_such_role:s3cret@{_server_part()}/postgres"
    with pytest.raises(DatabaseConnectError) as info:
        await connect_checked(dsn)
    assert info.value.kind == "authentication"
    assert "llmgw_no_such_role" in str(info.value) and "s3cret" not in str(info.value)


async def test_silent_server_times_out_with_a_cause(silent_port: int) -> None:
    started = time.monotonic()
    with pytest.raises(DatabaseConnectError) as info:
        await connect_checked(f"postgresql://u@127.0.0.1:{silent_port}/db", timeout=2.0)
    assert time.monotonic() - started < 30  # wide: the point is "not asyncpg's 60 s"
    assert info.value.kind == "timeout" and "2 s" in str(info.value)


async def test_migrate_against_a_silent_server_fails_fast_and_says_why(silent_port: int) -> None:
    started = time.monotonic()
    with pytest.raises(DatabaseError) as info:
        await apply_migrations(f"postgresql://u:s3cret@127.0.0.1:{silent_port}/db")
    elapsed = time.monotonic() - started
    assert elapsed < CONNECT_TIMEOUT + 25  # default bound, loaded machine
    message = str(info.value)
    cause = message.partition("cannot connect to PostgreSQL to migrate:")[2]
    assert cause.strip(), message
    assert "did not complete the connection" in cause and "s3cret" not in message


async def test_router_start_against_a_silent_server_fails_fast_and_says_why(
    silent_port: int,
) -> None:
    router = TenantLLMRouter(
        f"postgresql://u:s3cret@127.0.0.1:{silent_port}/db", providers={}, record_usage=False
    )
    started = time.monotonic()
    with pytest.raises(DatabaseError) as info:
        await router.start()
    await router.close()
    assert time.monotonic() - started < CONNECT_TIMEOUT + 25
    assert "did not complete the connection" in str(info.value)
    assert "s3cret" not in str(info.value)


# --- the CLI: one line, the cause, where to look -------------------------------------------


@pytest.mark.parametrize("dsn", BAD_DSNS)
def test_db_migrate_bad_dsn_is_one_line(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "migrate", "--dsn", dsn]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llm-gateway: ")
    assert "s3cret" not in err and "check --dsn" in err


def test_db_migrate_names_database_url_when_it_is_the_source(
    closed_port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://u:s3cret@127.0.0.1:{closed_port}/db")
    assert main(["db", "migrate"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "s3cret" not in err
    assert "no PostgreSQL reachable" in err and "check DATABASE_URL" in err


def test_default_connect_timeout_is_a_few_seconds() -> None:
    assert 1 <= CONNECT_TIMEOUT <= 10
