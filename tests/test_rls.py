"""Tenant-scoped reads through row-level security (migration 007, ``usage.tenant_scope``).

As in production, the tables belong to a non-superuser role that applies the migrations and runs
the router; the reader is a real login role, a member of ``llm_gateway_tenant_reader``. Every
role made here has a unique name and is dropped at the end (roles are cluster-wide). The group
role ``llm_gateway_tenant_reader`` itself is shared by every database of the cluster, like in
production, so it is created if absent (the operator's step) and never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from llm_gateway import TenantLLMRouter, provider_settings
from llm_gateway.migrate import apply_migrations
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import ADMIN_DSN, make_tenant
from usage import tenant_scope

READER_GROUP = "llm_gateway_tenant_reader"
MSG = [{"role": "user", "content": "hello"}]
# Every table a reader may read, scoped to its tenant.
SCOPED = ("model_usage_stats", "model_usage_hourly", "usage_spend_counters", "budget_events")
# Tables a reader must not read at all: keys, secrets, all-tenant totals, process state.
FORBIDDEN = (
    "tenants",
    "llm_gateway_secrets",
    "model_usage_daily_totals",
    "quota_leases",
    "quota_uses",
    "llm_gateway_settings",
    "model_usage_stats_default",
)


def _dsn(user: str, database: str) -> str:
    scheme, _, rest = ADMIN_DSN.partition("://")
    hostpart = rest.rpartition("@")[2].rpartition("/")[0]
    return f"{scheme}://{user}@{hostpart}/{database}"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _ensure_reader_group() -> None:
    """The operator's one-time step; tolerant of another session creating it at the same time."""
    with contextlib.suppress(asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
        await _admin(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READER_GROUP}')"
            f" THEN CREATE ROLE {READER_GROUP} NOLOGIN; END IF; END $$"
        )


@dataclass(frozen=True)
class Cluster:
    database: str
    owner: str
    reader: str
    monitor: str
    tenant_a: uuid.UUID
    tenant_b: uuid.UUID
    rows_a: int
    rows_b: int

    def dsn(self, user: str) -> str:
        return _dsn(user, self.database)


async def _write_usage(owner_dsn: str) -> tuple[uuid.UUID, uuid.UUID, int, int]:
    """The router, running as the owner, writes real usage rows for two tenants."""
    conn = await asyncpg.connect(owner_dsn)
    try:
        a = await make_tenant(conn, llm_tokens={"groq": "gsk-tenant-a-secret"}, name="a")
        b = await make_tenant(conn, llm_tokens={"groq": "gsk-tenant-b-secret"}, name="b")
        async with SimulatedProvider(name="groq") as sim:
            providers = {"groq": provider_settings("groq", sim.root_url, api_key=None)}
            async with TenantLLMRouter(owner_dsn, providers=providers) as router:
                for _ in range(3):
                    await router.complete_for_tenant(a, MSG)
                await router.complete_for_tenant(b, MSG)
        rows_a = await conn.fetchval("SELECT count(*) FROM model_usage_stats WHERE tenant_id=$1", a)
        rows_b = await conn.fetchval("SELECT count(*) FROM model_usage_stats WHERE tenant_id=$1", b)
        await conn.execute("SELECT * FROM llm_gateway_maintain_usage()")
        # Planner statistics exist (the daily ANALYZE may have run before the rows did).
        await conn.execute("ANALYZE model_usage_stats")
        for tenant in (a, b):
            await conn.execute(
                "INSERT INTO budget_events (tenant_id, scope, period_start, threshold,"
                " spent_usd, max_usd) VALUES ($1, 'tenant', now(), 0.8, 8, 10)",
                tenant,
            )
    finally:
        await conn.close()
    return a, b, rows_a, rows_b


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    tag = uuid.uuid4().hex[:8]
    owner, reader, monitor = (f"llmgw_rls_{r}_{tag}" for r in ("owner", "reader", "monitor"))
    database = f"llmgw_rls_{tag}"

    async def setup() -> Cluster:
        await _ensure_reader_group()
        await _admin(
            f"CREATE ROLE {owner} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOBYPASSRLS;"
            f" CREATE ROLE {reader} LOGIN NOSUPERUSER NOBYPASSRLS IN ROLE {READER_GROUP};"
            f" CREATE ROLE {monitor} LOGIN NOSUPERUSER NOBYPASSRLS"
        )
        await _admin(f'CREATE DATABASE "{database}" OWNER {owner}')
        owner_dsn = _dsn(owner, database)
        await apply_migrations(owner_dsn)  # as the non-superuser owner
        a, b, rows_a, rows_b = await _write_usage(owner_dsn)
        conn = await asyncpg.connect(owner_dsn)
        try:  # an operator's monitoring role, granted like today
            await conn.execute(
                f"GRANT SELECT ON model_usage_stats, model_usage_hourly TO {monitor}"
            )
        finally:
            await conn.close()
        return Cluster(database, owner, reader, monitor, a, b, rows_a, rows_b)

    async def teardown() -> None:
        await _admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        for role in (reader, monitor, owner):
            await _admin(f"DROP ROLE IF EXISTS {role}")

    try:
        yield asyncio.run(setup())
    finally:
        asyncio.run(teardown())


@pytest.fixture
async def reader(cluster: Cluster) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(cluster.dsn(cluster.reader))
    try:
        yield conn
    finally:
        await conn.close()


async def _counts(conn: asyncpg.Connection, where: str = "true") -> dict[str, int]:
    return {t: await conn.fetchval(f"SELECT count(*) FROM {t} WHERE {where}") for t in SCOPED}


async def test_reader_sees_its_tenant_only_whatever_the_where(
    cluster: Cluster, reader: asyncpg.Connection
) -> None:
    a, b = cluster.tenant_a, cluster.tenant_b
    assert (cluster.rows_a, cluster.rows_b) == (3, 1)
    async with tenant_scope(reader, a):
        seen = await _counts(reader)
        assert seen["model_usage_stats"] == 3
        assert all(n > 0 for n in seen.values()), seen
        for table in SCOPED:
            tenants = await reader.fetch(f"SELECT DISTINCT tenant_id FROM {table}")
            assert [r["tenant_id"] for r in tenants] == [a], table
        # Asking for the other tenant, or for everything, changes nothing.
        assert set((await _counts(reader, f"tenant_id = '{b}'")).values()) == {0}
        assert await _counts(reader, f"true OR tenant_id = '{b}'") == seen
        # A WHERE that would raise on another tenant's row never sees one (the policy runs first).
        boom = f"1 / (CASE WHEN tenant_id = '{b}' THEN 0 ELSE 1 END) = 1"
        assert await _counts(reader, boom) == seen
        # The planner's statistics (most common values of every column) are hidden too.
        stats = await reader.fetchval(
            "SELECT count(*) FROM pg_stats WHERE tablename LIKE 'model_usage%'"
        )
        assert stats == 0
    async with tenant_scope(reader, str(b)):
        assert (await _counts(reader))["model_usage_stats"] == 1
        assert await reader.fetchval("SELECT DISTINCT tenant_id FROM model_usage_hourly") == b


async def test_no_tenant_set_sees_nothing_without_error(
    cluster: Cluster, reader: asyncpg.Connection
) -> None:
    # Never set on this session: current_setting(..., true) is NULL.
    assert set((await _counts(reader)).values()) == {0}
    async with tenant_scope(reader, cluster.tenant_a):
        assert (await _counts(reader))["model_usage_stats"] == 3
    # After the scoped transaction the setting reads '' (a pooled connection's state).
    assert await reader.fetchval("SELECT current_setting('llm_gateway.tenant_id', true)") == ""
    assert set((await _counts(reader)).values()) == {0}
    # Garbage from the application: no rows, never a cast error.
    a = str(cluster.tenant_a)
    for value in ("", " ", "not-a-uuid", "'; --", f"{{{a}}}", a.replace("-", ""), f" {a}"):
        async with reader.transaction():
            await reader.execute("SELECT set_config('llm_gateway.tenant_id', $1, true)", value)
            assert set((await _counts(reader)).values()) == {0}, value


async def test_reader_cannot_read_keys_secrets_or_other_tables(
    cluster: Cluster, reader: asyncpg.Connection
) -> None:
    partitions = await reader.fetch(
        "SELECT inhrelid::regclass::text AS p FROM pg_inherits"
        " WHERE inhparent = 'model_usage_stats'::regclass"
    )
    assert len(partitions) > 1
    for table in (*FORBIDDEN, *(r["p"] for r in partitions)):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with tenant_scope(reader, cluster.tenant_a):
                await reader.fetch(f"SELECT * FROM {table} LIMIT 1")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with tenant_scope(reader, cluster.tenant_a):
            await reader.execute("DELETE FROM model_usage_stats")


async def test_owner_and_monitoring_roles_see_every_row(cluster: Cluster) -> None:
    total = cluster.rows_a + cluster.rows_b
    for role in (cluster.owner, cluster.monitor):
        conn = await asyncpg.connect(cluster.dsn(role))
        try:
            assert await conn.fetchval("SELECT count(*) FROM model_usage_stats") == total, role
            tenants = await conn.fetchval(
                "SELECT count(DISTINCT tenant_id) FROM model_usage_hourly"
            )
            assert tenants == 2, role
            if role == cluster.owner:  # so the reader's empty pg_stats above means hidden
                stats = await conn.fetchval(
                    "SELECT count(*) FROM pg_stats WHERE tablename = 'model_usage_stats'"
                )
                assert stats > 0
        finally:
            await conn.close()


async def test_partitions_made_later_are_scoped_too(
    cluster: Cluster, reader: asyncpg.Connection
) -> None:
    owner = await asyncpg.connect(cluster.dsn(cluster.owner))
    try:
        made = await owner.fetch("SELECT * FROM llm_gateway_ensure_usage_partitions(9)")
        assert made, "maintenance made new monthly partitions"
        unscoped = await owner.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'model_usage_stats'::regclass AND NOT c.relrowsecurity"
        )
        assert unscoped == []
        # An operator's mistaken grant on a partition still shows one tenant's rows only.
        part = await owner.fetchval(
            "SELECT tableoid::regclass::text FROM model_usage_stats WHERE tenant_id = $1 LIMIT 1",
            cluster.tenant_b,
        )
        await owner.execute(f"GRANT SELECT ON {part} TO {READER_GROUP}")
        async with tenant_scope(reader, cluster.tenant_a):
            seen = await reader.fetch(f"SELECT DISTINCT tenant_id FROM {part}")
        assert [r["tenant_id"] for r in seen] == [cluster.tenant_a]
        await owner.execute(f"REVOKE SELECT ON {part} FROM {READER_GROUP}")
    finally:
        await owner.close()


async def test_owner_writes_through_copy_as_today(cluster: Cluster) -> None:
    # The usage writer's fresh-batch path is a plain COPY, which PostgreSQL refuses on a table
    # with row-level security for a role the policy applies to: the owner is not one.
    owner = await asyncpg.connect(cluster.dsn(cluster.owner))
    try:
        tenant = uuid.uuid4()
        await owner.copy_records_to_table(
            "model_usage_stats",
            records=[(uuid.uuid4(), tenant, "groq", "m", 5, Decimal("0.5"), "success")],
            columns=[
                "id",
                "tenant_id",
                "provider",
                "model_name",
                "latency_ms",
                "estimated_cost_usd",
                "status",
            ],
        )
        spend = await owner.fetchval(
            "SELECT sum(cost_usd) FROM usage_spend_counters WHERE tenant_id = $1 AND grain = 'h'",
            tenant,
        )
        assert spend == Decimal("0.5")
    finally:
        await owner.close()


async def test_tenant_scope_is_one_transaction(
    cluster: Cluster, reader: asyncpg.Connection
) -> None:
    with pytest.raises(ValueError, match="tenant"):
        async with tenant_scope(reader, "not-a-uuid"):
            pass
    assert not reader.is_in_transaction()
    async with reader.transaction():
        # Inside a caller's transaction the setting would outlive the block: refused.
        with pytest.raises(RuntimeError, match="transaction"):
            async with tenant_scope(reader, cluster.tenant_a):
                pass
    with pytest.raises(KeyError):
        async with tenant_scope(reader, cluster.tenant_a):
            assert reader.is_in_transaction()
            raise KeyError("rolled back, scope gone")
    assert await reader.fetchval("SELECT current_setting('llm_gateway.tenant_id', true)") == ""


async def test_role_creation_is_idempotent_and_tolerates_a_concurrent_creator() -> None:
    tag = uuid.uuid4().hex[:8]
    creator, plain, made = f"llmgw_rls_cr_{tag}", f"llmgw_rls_nocr_{tag}", f"llmgw_rls_made_{tag}"
    database = f"llmgw_rls_roles_{tag}"
    await _admin(f"CREATE ROLE {creator} LOGIN CREATEROLE; CREATE ROLE {plain} LOGIN")
    await _admin(f'CREATE DATABASE "{database}" OWNER {creator}')
    try:
        await apply_migrations(_dsn(creator, database))
        first = await asyncpg.connect(_dsn(creator, database))
        second = await asyncpg.connect(_dsn(creator, database))
        try:
            sql = "SELECT llm_gateway_create_role_if_absent($1)"
            # Two databases' migrations at once: the second waits on the first's new role,
            # then finds it made, and succeeds.
            tx = first.transaction()
            await tx.start()
            assert await first.fetchval(sql, made) is True
            racer = asyncio.ensure_future(second.fetchval(sql, made))
            for _ in range(200):
                waiting = await first.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                    second.get_server_pid(),
                )
                if waiting:
                    break
                await asyncio.sleep(0.05)
            assert waiting, "the second creator waits for the first"
            await tx.commit()
            assert await racer is True
            assert await first.fetchval(sql, made) is True  # again: nothing to do
            assert await first.fetchval(
                "SELECT NOT rolcanlogin FROM pg_roles WHERE rolname = $1", made
            )
        finally:
            await first.close()
            await second.close()
        # A role that may not create roles: no error, a warning, and False.
        conn = await asyncpg.connect(_dsn(plain, database))
        try:
            warnings: list[str] = []
            conn.add_log_listener(lambda _c, msg: warnings.append(str(msg)))
            missing = f"llmgw_rls_never_{tag}"
            assert (
                await conn.fetchval("SELECT llm_gateway_create_role_if_absent($1)", missing)
                is False
            )
            assert any(missing in w for w in warnings), warnings
        finally:
            await conn.close()
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await _admin(f"DROP ROLE IF EXISTS {made}")
        await _admin(f"DROP ROLE IF EXISTS {plain}")
        await _admin(f"DROP ROLE IF EXISTS {creator}")


async def test_a_non_owner_writer_role_still_writes_every_batch(
    cluster: Cluster, tmp_path: Path
) -> None:
    # PostgreSQL refuses COPY into a table with row security to a role that is not its owner.
    # A router writing as such a role (INSERT granted) must not fail every fresh batch.
    from tests.test_usage_tracker import make_row, tracker_for

    writer = f"llmgw_rls_writer_{uuid.uuid4().hex[:8]}"
    await _admin(f"CREATE ROLE {writer} LOGIN NOSUPERUSER NOBYPASSRLS")
    owner = await asyncpg.connect(cluster.dsn(cluster.owner))
    try:
        await owner.execute(
            f"GRANT SELECT, INSERT ON model_usage_stats TO {writer};"
            f" GRANT SELECT, INSERT, UPDATE ON usage_spend_counters TO {writer}"
        )
        tenant = uuid.uuid4()
        tracker = tracker_for(cluster.dsn(writer), tmp_path, maintenance_interval=3600.0)
        await tracker.start()
        for batch in range(3):
            for i in range(10):
                tracker.record(make_row(tenant, batch * 10 + i))
            assert await tracker.flush(timeout=30)
        backlog = await tracker.close()
        assert (backlog.written_rows, backlog.spooled_total) == (30, 0)
        assert backlog.failed_batches == 0, backlog.last_error
        stored = await owner.fetchval(
            "SELECT count(*) FROM model_usage_stats WHERE tenant_id = $1", tenant
        )
        assert stored == 30
    finally:
        await owner.execute(f"REVOKE ALL ON model_usage_stats, usage_spend_counters FROM {writer}")
        await owner.close()
        await _admin(f"DROP ROLE IF EXISTS {writer}")
