"""``llm-gateway serve --workers 2`` as a real process: revocations reach every worker, and
SIGTERM lets requests in flight finish with their usage rows in PostgreSQL.

The simulated provider runs in the test process; the server's workers reach it over loopback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from llm_gateway.server.virtual_keys import VirtualKeyStore
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import make_tenant

SCRIPT = Path(sys.executable).parent / "llm-gateway"
MSG = [{"role": "user", "content": "slow one"}]
TIMEOUT = 120  # a hang must end the test; the machine is loaded


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_env(pg_dsn: str, sim: SimulatedProvider, spool: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.endswith(("_API_KEY", "_BASE_URL")) and k != "LLM_GATEWAY_FINGERPRINT_KEY"
    }
    env.update(
        DATABASE_URL=pg_dsn,
        OPENAI_BASE_URL=sim.base_url,
        OPENAI_API_KEY="sk-system",
        LLM_GATEWAY_SPOOL_DIR=str(spool),
    )
    return env


async def serve(
    pg_dsn: str, sim: SimulatedProvider, tmp_path: Path, port: int, *args: str
) -> asyncio.subprocess.Process:
    """``llm-gateway serve --port PORT ARGS`` (warning logs unless ARGS say otherwise)."""
    return await asyncio.create_subprocess_exec(
        str(SCRIPT),
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *args,
        env=serve_env(pg_dsn, sim, tmp_path / "spool"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def wait_ready(url: str, proc: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient() as http, asyncio.timeout(TIMEOUT):
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"serve exited with {proc.returncode}")
            try:
                if (await http.get(f"{url}/health/readiness")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)


async def post(url: str, key: str, **body: object) -> httpx.Response:
    """One request on a connection of its own, so the workers take turns."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        return await http.post(
            f"{url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "gpt-4o-mini", "messages": MSG, **body},
        )


@pytest.fixture
async def keys(pg_dsn: str) -> AsyncIterator[VirtualKeyStore]:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    store = VirtualKeyStore(pool, notify=False)
    await store.start()
    try:
        yield store
    finally:
        await store.close()
        await pool.close()


async def test_workers_refuse_a_revoked_key_and_sigterm_finishes_requests_in_flight(
    pg_dsn: str, pg: asyncpg.Connection, keys: VirtualKeyStore, tmp_path: Path
) -> None:
    tenant = await make_tenant(pg)
    raw, record = await keys.create(tenant, name="proc")
    doomed, doomed_record = await keys.create(tenant, name="to revoke")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with SimulatedProvider(name="a") as sim:
        proc = await serve(
            pg_dsn, sim, tmp_path, port, "--workers", "2", "--shutdown-timeout", "30"
        )
        try:
            await wait_ready(url, proc)
            # Both workers serve (and cache) the key, then it is revoked from this process.
            for _ in range(6):
                assert (await post(url, doomed)).status_code == 200
            assert await keys.revoke(doomed_record.id)
            async with asyncio.timeout(30):  # the notice reaches the workers
                while True:
                    if (await post(url, doomed)).status_code == 401:
                        break
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            refused = [await post(url, doomed) for _ in range(8)]
            assert {r.status_code for r in refused} == {401}
            assert all("revoked" in r.json()["error"]["message"] for r in refused)

            # SIGTERM while a slow request and a slow stream are at the provider.
            sim.latency_ms = 3000
            before = len(sim.requests)
            session = f"term-{uuid.uuid4().hex[:8]}"
            headers_body = {"user": "u-term"}
            slow = asyncio.create_task(
                post_with_session(url, raw, session, stream=False, **headers_body)
            )
            streamed = asyncio.create_task(
                post_with_session(url, raw, session, stream=True, **headers_body)
            )
            async with asyncio.timeout(TIMEOUT):
                while True:
                    if len(sim.requests) >= before + 2:  # both are at the provider
                        break
                    await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            answer, stream_answer = await asyncio.gather(slow, streamed)
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"] == "[a] slow one"
            assert stream_answer.status_code == 200
            assert stream_answer.text.endswith("data: [DONE]\n\n")
            async with asyncio.timeout(TIMEOUT):
                _, stderr = await proc.communicate()
            assert proc.returncode == 0, stderr.decode()[-2000:]
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    rows = await pg.fetch(
        "SELECT status, user_id, virtual_key_id FROM model_usage_stats WHERE session_id = $1",
        session,
    )
    assert [(r["status"], r["user_id"]) for r in rows] == [("success", "u-term")] * 2
    assert {r["virtual_key_id"] for r in rows} == {str(record.id)}


async def post_with_session(
    url: str, key: str, session: str, *, stream: bool, user: str
) -> httpx.Response:
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        return await http.post(
            f"{url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}", "x-llm-gateway-session": session},
            json={"model": "gpt-4o-mini", "messages": MSG, "stream": stream, "user": user},
        )


async def test_a_request_cut_off_by_the_shutdown_bound_gets_a_503_and_its_row(
    pg_dsn: str, pg: asyncpg.Connection, keys: VirtualKeyStore, tmp_path: Path
) -> None:
    tenant = await make_tenant(pg)
    raw, _ = await keys.create(tenant, name="cut off")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    session = f"cut-{uuid.uuid4().hex[:8]}"
    async with SimulatedProvider(name="a", latency_ms=60_000) as sim:
        proc = await serve(
            pg_dsn, sim, tmp_path, port, "--shutdown-timeout", "1", "--log-level", "critical"
        )
        try:
            await wait_ready(url, proc)
            slow = asyncio.create_task(
                post_with_session(url, raw, session, stream=False, user="u-cut")
            )
            async with asyncio.timeout(TIMEOUT):
                while True:  # until it is at the provider, which answers in a minute
                    if sim.requests:
                        break
                    await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            answer = await slow
            async with asyncio.timeout(TIMEOUT):
                _, stderr = await proc.communicate()
            # One process: uvicorn (0.29 on) re-raises the SIGTERM it handled once shut down.
            assert proc.returncode in (0, -signal.SIGTERM), stderr.decode()[-2000:]
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    # The OpenAI error shape the clients parse, not uvicorn's plain-text 500.
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["error"]["code"] == "shutting_down"
    rows = await pg.fetch(
        "SELECT status, user_id FROM model_usage_stats WHERE session_id = $1", session
    )
    assert [(r["status"], r["user_id"]) for r in rows] == [("cancelled", "u-cut")]
