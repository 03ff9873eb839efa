"""The official Node ``openai`` client (from npm) against the gateway: streamed and not, tools,
a bad key and the model list.

Skipped only when ``node`` or ``npm`` is not installed. The package is installed once into a
folder under the system temp directory and reused by later runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import asyncpg
import pytest

from tests.test_server import gateway

SCRIPT = Path(__file__).parent / "node" / "openai_client.cjs"
PACKAGE = "openai@6"
TIMEOUT = 120


@pytest.fixture(scope="session")
def openai_module() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the Node openai client test (not installed)")
    folder = Path(tempfile.gettempdir()) / "llm-gateway-node-openai-6"
    module = folder / "node_modules" / "openai"
    if not (module / "package.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(folder), PACKAGE],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return module


async def test_node_openai_client(
    pg_dsn: str, pg: asyncpg.Connection, tmp_path: Path, openai_module: Path
) -> None:
    async with gateway(pg_dsn, pg, tmp_path) as served:
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(SCRIPT),
            f"{served.url}/v1",
            served.key,
            env={"OPENAI_MODULE": str(openai_module), "PATH": os.environ.get("PATH", "")},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(TIMEOUT):
            stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()[-3000:]
        out = json.loads(stdout)
        rows = await served.rows()
    assert out["content"] == "[a] hello node"
    assert out["usage"]["total_tokens"] > 0
    assert out["streamed"] == "[a] hello node"
    assert out["stream_usage"]["completion_tokens"] > 0
    (call,) = out["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "hello node"}
    assert out["tool_finish"] == "tool_calls"
    assert out["bad_key"]["status"] == 401
    assert set(out["bad_key"]["error"]) == {"message", "type", "param", "code"}
    assert "gpt-4o-mini" in out["models"]
    assert [r["status"] for r in rows] == ["success"] * 3
