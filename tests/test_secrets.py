"""Tenant API keys encrypted at rest: the key ring, the envelope, decryption at config load,
``set_tenant_keys``, and ``tenants encrypt|rotate|set-key`` (real PostgreSQL, real HTTP)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from llm_gateway import InvalidTenantConfigError, TenantLLMRouter, provider_settings
from llm_gateway.config import parse_tenant_config
from llm_gateway.secrets import DecryptError, KeyRing, KeyRingError, generate_entry, key_id_of
from llm_gateway.simulator import SimulatedProvider
from llm_gateway.tenant_keys import reencrypt_tenants, set_tenant_keys
from tests.conftest import ADMIN_DSN, make_tenant, scratch_database

T = uuid.UUID("8f0c6a52-3f43-4b1e-9a70-2a1f3c5d7e90")
OTHER = uuid.UUID("11111111-2222-4333-8444-555555555555")
K1 = bytes(range(32))
K2 = bytes(range(100, 132))
RING1 = f"k1:{base64.b64encode(K1).decode()}"
RING2 = f"k2:{base64.urlsafe_b64encode(K2).decode().rstrip('=')}"  # URL-safe, unpadded
SECRET = "gsk_live_do-not-leak-0123456789"
MSG = [{"role": "user", "content": "hello"}]
ROOT = Path(__file__).resolve().parents[1]


# --- the key ring and the envelope ---------------------------------------------------------


def test_keyring_parses_standard_and_urlsafe_base64_first_key_active() -> None:
    ring = KeyRing.parse(f" {RING2} , {RING1} ")
    assert ring.key_ids == ("k2", "k1")
    assert ring.active_id == "k2"
    assert KeyRing.coerce({"k1": K1, "k2": K2}).active_id == "k1"
    assert KeyRing.coerce(None).key_ids == KeyRing.from_env().key_ids


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"k1:{base64.b64encode(K1[:16]).decode()}", "must be 32 bytes, not 16"),
        ("k1:not*base64", "not base64"),
        (f"{RING1},{RING1}", "appears twice"),
        ("k1", "not <id>:<base64 key>"),
        (f"bad id:{base64.b64encode(K1).decode()}", "must be 1-32"),
    ],
)
def test_malformed_keyring_is_refused_without_showing_key_material(
    text: str, expected: str
) -> None:
    with pytest.raises(KeyRingError, match=expected) as info:
        KeyRing.parse(text)
    assert base64.b64encode(K1).decode()[:12] not in str(info.value)


def test_keyring_repr_shows_ids_only_and_cannot_be_pickled() -> None:
    ring = KeyRing.parse(RING1)
    assert repr(ring) == str(ring) == "KeyRing(key_ids=('k1',))"
    with pytest.raises(TypeError):
        pickle.dumps(ring)


def test_envelope_format_and_round_trip() -> None:
    ring = KeyRing.parse(f"{RING1},{RING2}")
    sealed = ring.encrypt(T, "groq", SECRET)
    assert sealed.startswith("enc:v1:k1:")
    assert SECRET not in sealed
    assert key_id_of(sealed) == "k1"
    raw = base64.b64decode(sealed.split(":", 3)[3])
    assert len(raw) == 12 + len(SECRET) + 16  # nonce, ciphertext, GCM tag
    assert ring.decrypt(T, "groq", sealed) == SECRET
    assert ring.encrypt(T, "groq", SECRET) != sealed  # a fresh nonce every time
    # Any key of the ring decrypts: a value under k2 still reads once k1 is active.
    old = KeyRing.parse(RING2).encrypt(T, "groq", SECRET)
    assert ring.decrypt(T, "groq", old) == SECRET


def _tamper(sealed: str) -> str:
    head, body = sealed.rsplit(":", 1)
    raw = bytearray(base64.b64decode(body))
    raw[-1] ^= 1
    return f"{head}:{base64.b64encode(bytes(raw)).decode()}"


@pytest.mark.parametrize(
    ("tenant", "provider", "mutate", "reason"),
    [
        (OTHER, "groq", None, "authentication failed"),  # copied into another tenant's row
        (T, "openai", None, "authentication failed"),  # into another provider's slot
        (T, "groq", _tamper, "authentication failed"),
        (T, "groq", lambda s: s.replace("enc:v1:k1:", "enc:v1:k9:"), "unknown key id"),
        (T, "groq", lambda s: s.replace("enc:v1:k1:", "enc:v1:k2:"), "authentication failed"),
        (T, "groq", lambda s: s.replace("enc:v1:", "enc:v7:"), "unsupported envelope"),
        (T, "groq", lambda s: s[:20], "malformed"),
    ],
)
def test_value_bound_to_tenant_provider_and_key(tenant, provider, mutate, reason) -> None:  # type: ignore[no-untyped-def]
    ring = KeyRing.parse(f"{RING1},{RING2}")
    sealed = ring.encrypt(T, "groq", SECRET)
    value = mutate(sealed) if mutate else sealed
    with pytest.raises(DecryptError, match=reason) as info:
        ring.decrypt(tenant, provider, value)
    assert SECRET not in str(info.value)
    assert value.rsplit(":", 1)[-1][:16] not in str(info.value)


def test_generate_entry_is_a_valid_ring() -> None:
    ring = KeyRing.parse(generate_entry("2026-12"))
    assert ring.key_ids == ("2026-12",)
    assert KeyRing.parse(generate_entry()).active_id is not None
    with pytest.raises(KeyRingError):
        generate_entry("a:b")


# --- decryption at config load ---------------------------------------------------------


def test_config_load_decrypts_and_names_field_and_key_id_on_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    ring = KeyRing.parse(RING1)
    sealed = ring.encrypt(T, "groq", SECRET)
    config = parse_tenant_config(T, {"Groq (Llama)": sealed}, {}, keyring=ring)
    assert config.keys["groq"].reveal() == SECRET
    with pytest.raises(InvalidTenantConfigError) as info:
        parse_tenant_config(OTHER, {"groq": sealed}, {}, keyring=ring)
    assert info.value.field == "llm_tokens.groq"
    assert "'k1'" in str(info.value)
    with pytest.raises(InvalidTenantConfigError, match="unknown key id"):
        parse_tenant_config(T, {"groq": sealed}, {})  # no ring at all
    for text in (str(info.value), repr(info.value), caplog.text):
        assert SECRET not in text
        assert sealed.rsplit(":", 1)[-1][:16] not in text


def test_plaintext_still_read_with_one_warning_per_tenant(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ring = KeyRing.parse(RING1)
    with caplog.at_level(logging.WARNING, logger="llm_gateway"):
        for _ in range(3):
            config = parse_tenant_config(T, {"groq": SECRET, "openai": "sk-x"}, {}, keyring=ring)
            parse_tenant_config(OTHER, {"groq": SECRET}, {}, keyring=ring)
    assert config.keys["groq"].reveal() == SECRET
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert f"tenant {T} has plaintext API keys in llm_tokens (groq, openai)" in warnings[0]
    assert all(SECRET not in w for w in warnings)


# --- the router --------------------------------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedProvider]:
    async with SimulatedProvider(name="openai") as s:
        yield s


def _router(pg_dsn: str, sim: SimulatedProvider, keyring: object = RING1) -> TenantLLMRouter:
    providers = {"openai": provider_settings("openai", sim.base_url)}
    return TenantLLMRouter(pg_dsn, providers=providers, keyring=keyring, record_usage=False)  # type: ignore[arg-type]


async def test_router_serves_encrypted_keys_and_fails_only_the_bad_tenant(
    pg_dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ring = KeyRing.parse(RING1)
    good = await make_tenant(pg)
    await pg.execute(
        "UPDATE tenants SET llm_tokens = jsonb_build_object('openai', $2::text) WHERE id = $1",
        good,
        ring.encrypt(good, "openai", SECRET),
    )
    # The good tenant's ciphertext copied into another tenant's row must not decrypt there.
    copied = await make_tenant(pg)
    await pg.execute(
        "UPDATE tenants SET llm_tokens = t.llm_tokens FROM tenants t WHERE t.id = $2"
        " AND tenants.id = $1",
        copied,
        good,
    )
    async with _router(pg_dsn, sim) as router:
        with pytest.raises(InvalidTenantConfigError) as info:
            await router.complete_for_tenant(copied, MSG)
        result = await router.complete_for_tenant(good, MSG)
    assert result.key_source == "tenant"
    assert sim.keys_seen() == [SECRET]
    assert info.value.field == "llm_tokens.openai"
    assert "key id 'k1'" in str(info.value)
    for text in (str(info.value), repr(info.value), caplog.text, repr(router)):
        assert SECRET not in text


async def test_set_tenant_keys_merges_removes_and_is_seen_at_once(
    pg_dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider
) -> None:
    tid = await make_tenant(pg, llm_tokens={"OpenAI (gpt-4o)": "sk-old-plain", "groq": "gsk-keep"})
    async with _router(pg_dsn, sim) as router:
        await router.complete_for_tenant(tid, MSG)  # cached with the old key
        await router.set_tenant_keys(tid, {"openai": SECRET})
        await router.complete_for_tenant(tid, MSG)
        stored = json.loads(await pg.fetchval("SELECT llm_tokens FROM tenants WHERE id=$1", tid))
        await router.set_tenant_keys(str(tid), {"groq": None})
        after = json.loads(await pg.fetchval("SELECT llm_tokens FROM tenants WHERE id=$1", tid))
    assert sim.keys_seen() == ["sk-old-plain", SECRET]
    # The other spelling of openai was replaced, groq kept; the new key is only ciphertext.
    assert set(stored) == {"openai", "groq"}
    assert stored["openai"].startswith("enc:v1:k1:") and SECRET not in json.dumps(stored)
    assert set(after) == {"openai"}


async def test_set_tenant_keys_concurrent_writers_do_not_lose_each_other(
    pg_dsn: str, pg: asyncpg.Connection
) -> None:
    tid = await make_tenant(pg)
    ring = KeyRing.parse(RING1)
    pool = await asyncpg.create_pool(pg_dsn, min_size=4, max_size=4)
    try:
        names = ["groq", "openrouter", "llm7", "openai"]
        for _ in range(5):
            await asyncio.gather(
                *(set_tenant_keys(pool, ring, tid, {n: f"key-{n}"}) for n in names)
            )
    finally:
        await pool.close()
    stored = json.loads(await pg.fetchval("SELECT llm_tokens FROM tenants WHERE id=$1", tid))
    assert {n: ring.decrypt(tid, n, v) for n, v in stored.items()} == {n: f"key-{n}" for n in names}


async def test_set_tenant_keys_refuses_without_a_keyring(pg: asyncpg.Connection) -> None:
    tid = await make_tenant(pg)
    with pytest.raises(KeyRingError, match="LLM_GATEWAY_KEYRING"):
        await set_tenant_keys(pg, KeyRing(), tid, {"groq": SECRET})


# --- encrypt / rotate over a whole table ---------------------------------------------------


@pytest.fixture(scope="module")
def own_dsn() -> Iterator[str]:
    """A database of its own: these commands rewrite every tenant of the table."""
    with scratch_database("secrets") as dsn:
        yield dsn


@pytest.fixture
async def db(own_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(own_dsn)
    await conn.execute("DELETE FROM tenants")
    try:
        yield conn
    finally:
        await conn.close()


async def _tokens(conn: asyncpg.Connection) -> dict[uuid.UUID, dict[str, object]]:
    rows = await conn.fetch("SELECT id, llm_tokens::text AS t FROM tenants")
    return {r["id"]: json.loads(r["t"]) for r in rows}


async def test_encrypt_then_rotate_in_batches_idempotent(db: asyncpg.Connection) -> None:
    tids = [await make_tenant(db, llm_tokens={"groq": f"gsk-{i}", "llm7": None}) for i in range(5)]
    ring1 = KeyRing.parse(RING1)
    first = await reencrypt_tenants(db, ring1, batch_size=2)
    assert (first.tenants_read, first.tenants_written, first.keys_encrypted) == (5, 5, 5)
    again = await reencrypt_tenants(db, ring1, batch_size=2)
    assert (again.tenants_written, again.keys_encrypted, again.failures) == (0, 0, [])
    stored = await _tokens(db)
    for i, tid in enumerate(tids):
        assert stored[tid]["llm7"] is None
        assert ring1.decrypt(tid, "groq", str(stored[tid]["groq"])) == f"gsk-{i}"

    ring21 = KeyRing.parse(f"{RING2},{RING1}")
    assert (await reencrypt_tenants(db, ring21, batch_size=2)).keys_rotated == 0  # no rotate
    rotated = await reencrypt_tenants(db, ring21, rotate=True, batch_size=2)
    assert (rotated.tenants_written, rotated.keys_rotated) == (5, 5)
    assert (await reencrypt_tenants(db, ring21, rotate=True, batch_size=2)).tenants_written == 0
    stored = await _tokens(db)
    ring2 = KeyRing.parse(RING2)  # the old key is no longer needed
    for i, tid in enumerate(tids):
        assert ring2.decrypt(tid, "groq", str(stored[tid]["groq"])) == f"gsk-{i}"


async def test_undecryptable_value_is_skipped_and_reported(db: asyncpg.Connection) -> None:
    ring = KeyRing.parse(RING1)
    bad = await make_tenant(db)
    wrong = ring.encrypt(OTHER, "groq", SECRET)  # another tenant's ciphertext
    await db.execute(
        "UPDATE tenants SET llm_tokens = jsonb_build_object('groq', $2::text, 'openai', 'sk-p')"
        " WHERE id = $1",
        bad,
        wrong,
    )
    fine = await make_tenant(db, llm_tokens={"groq": "gsk-fine"})
    report = await reencrypt_tenants(db, ring, rotate=True)
    assert [(f.tenant_id, f.field) for f in report.failures] == [(bad, "llm_tokens.groq")]
    assert "key id 'k1'" in report.failures[0].reason
    stored = await _tokens(db)
    assert stored[bad]["groq"] == wrong  # left as it was
    assert ring.decrypt(bad, "openai", str(stored[bad]["openai"])) == "sk-p"  # the rest done
    assert ring.decrypt(fine, "groq", str(stored[fine]["groq"])) == "gsk-fine"


async def test_concurrent_edit_is_not_overwritten(own_dsn: str, db: asyncpg.Connection) -> None:
    """A row edited between the command's read and its write is read again, not clobbered."""
    tid = await make_tenant(db, llm_tokens={"groq": "gsk-before"})
    editor = await asyncpg.connect(own_dsn)
    try:
        tx = editor.transaction()
        await tx.start()
        # Holds the row lock; the command still reads the old committed value.
        await editor.execute(
            'UPDATE tenants SET llm_tokens = \'{"groq": "gsk-after", "llm7": "l7"}\' WHERE id = $1',
            tid,
        )
        task = asyncio.create_task(reencrypt_tenants(db, KeyRing.parse(RING1)))
        for _ in range(600):  # until the command's UPDATE waits on our lock (wide bound)
            waiting = await editor.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting, "the command never waited on the row lock"
        await tx.commit()
        report = await task
    finally:
        await editor.close()
    assert report.retries == 1
    stored = (await _tokens(db))[tid]
    ring = KeyRing.parse(RING1)
    assert {k: ring.decrypt(tid, k, str(v)) for k, v in stored.items()} == {
        "groq": "gsk-after",
        "llm7": "l7",
    }


# --- the command line --------------------------------------------------------------------


def _cli(
    *args: str, dsn: str, stdin: str = "", ring: str = RING1
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": dsn, "LLM_GATEWAY_KEYRING": ring}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "llm_gateway.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_keys_generate_prints_a_ring_entry() -> None:
    proc = _cli("keys", "generate", "--id", "k2026", dsn=ADMIN_DSN)
    assert proc.returncode == 0, proc.stderr
    assert KeyRing.parse(proc.stdout.strip()).key_ids == ("k2026",)


async def test_cli_set_key_reads_stdin_and_refuses_argv(
    own_dsn: str, db: asyncpg.Connection
) -> None:
    tid = await make_tenant(db)
    refused = await asyncio.to_thread(
        _cli, "tenants", "set-key", str(tid), "groq", SECRET, dsn=own_dsn
    )
    assert refused.returncode == 2
    assert "argv is visible" in refused.stderr and SECRET not in refused.stderr + refused.stdout
    refused = await asyncio.to_thread(
        _cli, "tenants", "set-key", str(tid), "groq", f"--key={SECRET}", dsn=own_dsn
    )
    assert refused.returncode == 2 and SECRET not in refused.stderr
    assert (await _tokens(db))[tid] == {}

    proc = await asyncio.to_thread(
        _cli, "tenants", "set-key", str(tid), "Groq", dsn=own_dsn, stdin=SECRET + "\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    stored = (await _tokens(db))[tid]
    assert KeyRing.parse(RING1).decrypt(tid, "groq", str(stored["groq"])) == SECRET


async def test_cli_encrypt_rotate_exit_codes(own_dsn: str, db: asyncpg.Connection) -> None:
    ok = await make_tenant(db, llm_tokens={"groq": SECRET})
    proc = await asyncio.to_thread(_cli, "tenants", "encrypt", "--batch-size", "1", dsn=own_dsn)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("1 of 1 tenants written")
    proc = await asyncio.to_thread(_cli, "tenants", "encrypt", "--format", "json", dsn=own_dsn)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tenants_written"] == 0

    bad = await make_tenant(db)
    sealed = KeyRing.parse(RING1).encrypt(ok, "openai", SECRET)  # ok's, in bad's row
    await db.execute(
        "UPDATE tenants SET llm_tokens = jsonb_build_object('openai', $2::text) WHERE id = $1",
        bad,
        sealed,
    )
    proc = await asyncio.to_thread(_cli, "tenants", "rotate", dsn=own_dsn, ring=f"{RING2},{RING1}")
    assert proc.returncode == 1
    assert f"tenant {bad}: llm_tokens.openai: cannot decrypt (key id 'k1'" in proc.stderr
    assert "1 of 2 tenants written" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr
    assert key_id_of(str((await _tokens(db))[ok]["groq"])) == "k2"

    proc = await asyncio.to_thread(_cli, "tenants", "encrypt", dsn=own_dsn, ring="")
    assert proc.returncode == 1 and "no key ring configured: set LLM_GATEWAY_KEYRING" in proc.stderr


async def test_router_keeps_serving_across_encrypt_and_rotate(
    own_dsn: str, db: asyncpg.Connection, sim: SimulatedProvider
) -> None:
    tid = await make_tenant(db, llm_tokens={"openai": SECRET})
    async with _router(own_dsn, sim, keyring=f"{RING2},{RING1}") as router:
        await router.complete_for_tenant(tid, MSG)
        await reencrypt_tenants(db, KeyRing.parse(RING1))  # an older process's ring
        router.invalidate_cache(tid)
        await router.complete_for_tenant(tid, MSG)
        await reencrypt_tenants(db, KeyRing.parse(f"{RING2},{RING1}"), rotate=True)
        router.invalidate_cache(tid)
        await router.complete_for_tenant(tid, MSG)
    assert key_id_of(str((await _tokens(db))[tid]["openai"])) == "k2"
    assert sim.keys_seen() == [SECRET] * 3
