"""Load on an OpenAI-compatible server's ``POST /v1/chat/completions``: requests/s, p50, p99.

The load generator is ``wrk`` (Debian package ``wrk``) with a Lua script that POSTs one
chat completion, on loopback, at each concurrency (default 1, 32 and 256), ``--repeats``
times; each figure is the median of the repeats, with their spread. Targets:

- ``ours``: ``llm-gateway serve --workers N`` on a scratch database (migrated, one tenant, one
  virtual key) whose tenant is served by the system key of ``openai``, pointed at the
  simulated provider (``python -m llm_gateway.simulator``, zero latency);
- ``litellm``: LiteLLM's proxy (``litellm --config``, from a separate venv given by
  ``--litellm``) with one model routed to the same simulator, authenticated by its master key;
- ``url``: any server already running (``--url``, ``--key``, ``--model``);
- ``auth``: no load, the CPU cost of one cached ``VirtualKeyStore.authenticate`` in process.

Run:  python bench/bench_server.py litellm --litellm /tmp/litellm-venv/bin/litellm
      python bench/bench_server.py ours --workers 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import _common

MODEL = "sim-model"
_LUA = """
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = %(auth)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"non2xx":%%d,"socket_errors":%%d,'
    .. '"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True, slots=True)
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    completed: int  # requests answered within the run (in flight at its end: not counted)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def lua_script(key: str, model: str) -> str:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    )
    path = Path(tempfile.mkstemp(suffix=".lua", prefix="bench_server_")[1])
    path.write_text(_LUA % {"body": json.dumps(body), "auth": json.dumps(f"Bearer {key}")})
    return str(path)


def post_once(url: str, key: str, model: str, timeout: float = 30.0) -> dict[str, object]:
    """One request, checked for the chat completion shape (a wrong target fails loudly)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}]})
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        answer: dict[str, object] = json.loads(resp.read())
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or "message" not in choices[0]:
        raise RuntimeError(f"not a chat completion: {str(answer)[:200]}")
    return answer


def wait_ready(
    url: str, key: str, model: str, proc: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before serving")
        try:
            post_once(url, key, model, timeout=5)
            return
        except (OSError, urllib.error.URLError, RuntimeError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout:g}s: {exc}") from None
            time.sleep(0.5)


def wrk(url: str, script: str, concurrency: int, duration: float, threads: int) -> Run:
    threads = max(1, min(threads, concurrency))
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{duration:g}s",
            "--timeout",
            "30s",
            "-s",
            script,
            f"{url}/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    r = json.loads(line.removeprefix("WRKJSON "))
    return Run(
        rps=r["requests"] / (r["duration_us"] / 1e6),
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        errors=r["non2xx"] + r["socket_errors"],
        completed=r["requests"],
    )


def measure(
    label: str, url: str, key: str, model: str, args: argparse.Namespace
) -> list[list[str]]:
    script = lua_script(key, model)
    rows: list[list[str]] = []
    try:
        wrk(url, script, 32, args.warmup, args.threads)  # warm caches, pools, JIT-free paths
        for c in args.concurrency:
            runs = [wrk(url, script, c, args.duration, args.threads) for _ in range(args.repeats)]
            rps = [r.rps for r in runs]
            # wrk reports latency only of answered requests: none answered, no latency.
            timed = [r for r in runs if r.completed] or None
            rows.append(
                [
                    label,
                    str(c),
                    f"{statistics.median(rps):,.0f}",
                    f"{min(rps):,.0f}-{max(rps):,.0f}",
                    "-" if timed is None else f"{statistics.median(r.p50_ms for r in timed):.2f}",
                    "-" if timed is None else f"{statistics.median(r.p99_ms for r in timed):.2f}",
                    str(sum(r.errors for r in runs)),
                    str(sum(r.completed for r in runs)),
                ]
            )
            print("  " + "  ".join(rows[-1]), flush=True)
    finally:
        os.unlink(script)
    return rows


@contextlib.contextmanager
def process(
    args: Sequence[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_litellm(args: argparse.Namespace, sim_url: str, workdir: Path) -> list[list[str]]:
    port, key = free_port(), "sk-bench-master"
    config = workdir / "litellm.yaml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "model_list": [
                    {
                        "model_name": MODEL,
                        "litellm_params": {
                            "model": f"openai/{MODEL}",
                            "api_base": sim_url,
                            "api_key": "sk-sim",
                        },
                    }
                ],
                "general_settings": {"master_key": key},
                "litellm_settings": {"telemetry": False, "drop_params": True},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False", NO_DOCS="True")
    cmd = [
        args.litellm,
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        str(args.workers),
    ]
    url = f"http://127.0.0.1:{port}"
    with process(cmd, env, workdir / "litellm.log") as proc:
        wait_ready(url, key, MODEL, proc, args.start_timeout)
        return measure(f"litellm x{args.workers}", url, key, MODEL, args)


async def _prepare_ours(dsn: str) -> tuple[str, str]:
    """Migrate, add a tenant served by the system `openai` key, and make it a virtual key."""
    import asyncpg

    from llm_gateway.migrate import apply_migrations
    from llm_gateway.server.virtual_keys import VirtualKeyStore

    await apply_migrations(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        tenant = await pool.fetchval(
            "INSERT INTO tenants (id, name, llm_tokens, inference_config) VALUES"
            " (gen_random_uuid(), 'bench', '{}', $1::text::jsonb) RETURNING id",
            json.dumps({"preferred_provider": "openai", "preferred_models": {"openai": MODEL}}),
        )
        raw, _ = await VirtualKeyStore(pool, notify=False).create(tenant, name="bench")
    finally:
        await pool.close()
    return raw, str(tenant)


def run_ours(args: argparse.Namespace, sim_url: str, workdir: Path) -> list[list[str]]:
    dsn = _common.dsn_for(args.admin_dsn, "llmgw_bench_server")
    admin_dsn = args.admin_dsn

    async def create() -> str:
        import asyncpg

        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute("DROP DATABASE IF EXISTS llmgw_bench_server WITH (FORCE)")
            await admin.execute("CREATE DATABASE llmgw_bench_server")
        finally:
            await admin.close()
        key, _ = await _prepare_ours(dsn)
        return key

    key = asyncio.run(create())
    port = free_port()
    env = dict(
        os.environ,
        DATABASE_URL=dsn,
        OPENAI_API_KEY="sk-sim",
        OPENAI_BASE_URL=sim_url,
        LLM_GATEWAY_SPOOL_DIR=str(workdir / "spool"),
    )
    for name in ("GROQ", "OPENROUTER", "LLM7", "LOCAL_LLM"):  # only the simulator answers
        env[f"{name}_BASE_URL"] = _common.refused_url()
    script = shutil.which("llm-gateway", path=str(Path(sys.executable).parent)) or "llm-gateway"
    cmd = [
        script,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(args.workers),
        "--log-level",
        "warning",  # no access log line per request (LiteLLM's runs log errors only too)
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        with process(cmd, env, workdir / "serve.log") as proc:
            wait_ready(url, key, MODEL, proc, args.start_timeout)
            return measure(f"llm-gateway x{args.workers}", url, key, MODEL, args)
    finally:
        if not args.keep_db:

            async def drop() -> None:
                import asyncpg

                admin = await asyncpg.connect(admin_dsn)
                try:
                    await admin.execute("DROP DATABASE IF EXISTS llmgw_bench_server WITH (FORCE)")
                finally:
                    await admin.close()

            asyncio.run(drop())


async def _auth_cost(admin_dsn: str, calls: int, repeats: int) -> list[float]:
    """Microseconds per cached ``VirtualKeyStore.authenticate`` (hash + cache + checks)."""
    import asyncpg

    from llm_gateway.migrate import apply_migrations
    from llm_gateway.server.virtual_keys import VirtualKeyStore

    async with _common.scratch_database(admin_dsn, "llmgw_bench_server_auth") as dsn:
        await apply_migrations(dsn)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            tenant = await pool.fetchval(
                "INSERT INTO tenants (id, name) VALUES (gen_random_uuid(), 'b') RETURNING id"
            )
            async with VirtualKeyStore(pool) as store:
                raw, _ = await store.create(tenant)
                await store.authenticate(raw)  # cached from here on
                per_call = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    for _ in range(calls):
                        await store.authenticate(raw)
                    per_call.append((time.perf_counter() - started) / calls * 1e6)
        finally:
            await pool.close()
    return per_call


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=("ours", "litellm", "url", "auth"))
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--litellm", default="litellm", help="the litellm executable (own venv)")
    parser.add_argument("--url", help="target=url: the server's root URL")
    parser.add_argument("--key", default="", help="target=url: the bearer key")
    parser.add_argument("--model", default=MODEL, help="target=url: the model requested")
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 32, 256],
        help="comma-separated (default 1,32,256)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--admin-dsn", default=_common.DEFAULT_ADMIN_DSN)
    parser.add_argument("--keep-db", action="store_true", help="keep llmgw_bench_server")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install -y wrk)")
    print(_common.environment(["llm-gateway"]))
    print(f"command: python bench/bench_server.py {' '.join(argv or sys.argv[1:])}")
    if args.target == "auth":
        us = asyncio.run(_auth_cost(args.admin_dsn, 20_000, max(args.repeats, 5)))
        print(
            f"cached authenticate: {statistics.median(us):.2f} us per call (median of {len(us)}"
            f" runs of 20,000; spread {min(us):.2f}-{max(us):.2f}); {_common.load_average()}"
        )
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_server_") as tmp:
        workdir = Path(tmp)
        if args.target == "url":
            if not args.url:
                parser.error("target url needs --url")
            rows = measure(args.url, args.url.rstrip("/"), args.key, args.model, args)
        else:
            with _common.simulator("sim", cpu=None) as sim:
                run = run_ours if args.target == "ours" else run_litellm
                try:
                    rows = run(args, sim.base_url, workdir)
                except Exception:
                    for log in workdir.glob("*.log"):
                        print(
                            f"--- {log.name} (last lines)\n"
                            + "\n".join(log.read_text(errors="replace").splitlines()[-30:]),
                            file=sys.stderr,
                        )
                    raise
    _common.print_table(
        f"POST /v1/chat/completions, wrk -t{args.threads}, {args.duration:g} s per run,"
        f" median of {args.repeats}",
        [
            "server",
            "concurrency",
            "req/s",
            "req/s spread",
            "p50 ms",
            "p99 ms",
            "errors",
            "answered",
        ],
        rows,
        note=_common.load_average(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
