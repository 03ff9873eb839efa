"""Every ```python block of README.md runs as written, against simulators and the test database.

Each block runs on its own (top-level ``await`` allowed) with these names already defined, as
the README says where it uses them:

- ``dsn``: the test database; also ``DATABASE_URL``;
- ``tenant_id``: a tenant with no keys of its own and the default config, so it is served with
  the system keys: ``OPENAI_API_KEY``/``OPENAI_BASE_URL`` point at a simulator, the other
  providers at a closed local port (no request ever leaves the machine).

The working directory is a temporary one. An HTML comment right before a block may say
``<!-- readme-test: then=NAME -->`` (after the block, ``await NAME()``: a hook the block defines)
or ``<!-- readme-test: skip=REASON -->``.
"""

from __future__ import annotations

import ast
import inspect
import re
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from llm_gateway import close_tenant_router
from llm_gateway.simulator import SimulatedProvider
from tests.conftest import make_tenant

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(
    r"(?:<!--\s*readme-test:\s*(?P<marker>[^>]*?)\s*-->\s*\n)?^```python\n(?P<code>.*?)^```",
    re.S | re.M,
)
_PROVIDERS = ("GROQ", "OPENROUTER", "LLM7", "OPENAI", "LOCAL_LLM")


@dataclass(frozen=True)
class Block:
    line: int
    code: str
    marker: dict[str, str]


def readme_blocks() -> list[Block]:
    text = README.read_text()
    blocks = []
    for match in _BLOCK.finditer(text):
        marker = dict(
            item.split("=", 1) for item in (match["marker"] or "").split(";") if "=" in item
        )
        line = text.count("\n", 0, match.start("code")) + 1
        blocks.append(Block(line, match["code"], {k.strip(): v.strip() for k, v in marker.items()}))
    return blocks


BLOCKS = readme_blocks()


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 4


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_block_uses_what_it_imports(block: Block) -> None:
    tree = ast.parse(block.code)
    imported = {
        (alias.asname or alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert imported - used == set()


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedProvider]:
    async with SimulatedProvider(name="readme") as provider:
        yield provider


@pytest.fixture
def environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_dsn: str, sim: SimulatedProvider
) -> None:
    """Provider variables point at the simulator (openai) or nowhere (the rest)."""
    nowhere = f"http://127.0.0.1:{_closed_port()}/v1"
    for provider in _PROVIDERS:
        monkeypatch.delenv(f"{provider}_API_KEY", raising=False)
        monkeypatch.setenv(f"{provider}_BASE_URL", nowhere)
    monkeypatch.delenv("LOCAL_LLM_BASE_URL")  # "local" exists only where its URL is set
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-readme-system")
    monkeypatch.setenv("DATABASE_URL", pg_dsn)
    monkeypatch.setenv("LLM_GATEWAY_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("environment")
@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
async def test_readme_block_runs(
    block: Block, pg_dsn: str, pg: asyncpg.Connection, sim: SimulatedProvider
) -> None:
    if "skip" in block.marker:
        pytest.skip(block.marker["skip"])
    tenant_id: uuid.UUID = await make_tenant(pg, name="readme")
    namespace: dict[str, Any] = {"__name__": "readme", "dsn": pg_dsn, "tenant_id": tenant_id}
    # Line numbers of a failure point into README.md.
    source = "\n" * (block.line - 1) + block.code
    code = compile(source, str(README), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    try:
        result = eval(code, namespace)
        if inspect.iscoroutine(result):
            await result
        if "then" in block.marker:
            await namespace[block.marker["then"]]()
    finally:
        await close_tenant_router()  # the module-level router must not outlive the block
