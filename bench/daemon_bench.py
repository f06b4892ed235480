"""Round trips through the shared daemon, as clients make them.

    .venv/bin/python -m bench.daemon_bench [--n N] [--only rest|front|embedded|cold]

- rest: `POST /api/v1/tasks` to a running daemon over one keep-alive connection
  (httpx2), submit only (tasks are delayed an hour, so no work competes); then
  `GET /api/v1/tasks/{id}` for the HTTP layer alone, and `engine.submit`
  in-process for the insert alone;
- front: `task_async` through `sidequest stdio` (the front) -> REST -> daemon,
  with the real MCP client over stdio: what Claude Code sees;
- embedded: the same tool call on `sidequest stdio --embedded` (engine in the
  stdio process), to show what the extra hop costs;
- cold: `sidequest serve --detach` on a fresh data dir until the daemon answers.
Every figure is submit-to-reply of a durable task row. This file only measures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx2
from mcp import Client, StdioServerParameters

import sidequest
from sidequest.config import AgentConfig, Settings
from sidequest.engine.engine import Engine
from sidequest.models import TaskOptions
from sidequest.server.daemon import read_state

REPO = Path(sidequest.__file__).resolve().parent.parent
CONFIG = """
max_concurrency = 8
[agents.noop]
executor = "python"
callable = "sidequest.testing.agents:noop"
"""


def _ms(samples: list[float]) -> str:
    samples = sorted(samples)
    p95 = samples[min(len(samples) - 1, int(len(samples) * 0.95))]
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return (
        f"p50 {statistics.median(samples) * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms, "
        f"p99 {p99 * 1000:.2f} ms (n={len(samples)})"
    )


def _env(home: Path) -> dict[str, str]:
    config = home / "bench.toml"
    if not config.exists():
        home.mkdir(parents=True, exist_ok=True)
        config.write_text(CONFIG, encoding="utf-8")
    return {
        **os.environ,
        "SIDEQUEST_HOME": str(home),
        "SIDEQUEST_CONFIG": str(config),
        "PYTHONPATH": str(REPO),
        "CLAUDE_PROJECT_DIR": str(home),
    }


def _cli(home: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "sidequest.cli", *args], env=_env(home), check=True, capture_output=True
    )
    return time.perf_counter() - started


async def bench_rest(home: Path, n: int) -> None:
    _cli(home, "serve", "--detach")
    state = read_state(home)
    assert state is not None
    body = {"agent_definition": "noop", "prompt": "x", "options": {"delay": "1h"}}
    headers = {"Authorization": f"Bearer {state.token}", "X-Sidequest-Project": str(home)}
    samples = []
    async with httpx2.AsyncClient(base_url=state.url, headers=headers) as http:
        for i in range(n + 20):
            started = time.perf_counter()
            response = await http.post("/api/v1/tasks", json=body)
            elapsed = time.perf_counter() - started
            assert response.status_code == 201, response.text
            if i >= 20:  # warm-up: connection, first-use imports
                samples.append(elapsed)
        task_id = response.json()["task_id"]
        reads = []
        for i in range(n + 20):
            started = time.perf_counter()
            response = await http.get(f"/api/v1/tasks/{task_id}")
            elapsed = time.perf_counter() - started
            assert response.status_code == 200, response.text
            if i >= 20:
                reads.append(elapsed)
    print(f"REST create task (keep-alive, sequential): {_ms(samples)}")
    print(f"REST get task (the HTTP layer without a write): {_ms(reads)}")


async def bench_submit(home: Path, n: int) -> None:
    """The floor under both: the engine's durable insert, in-process."""
    settings = Settings(home=home, agents={"noop": AgentConfig(callable="sidequest.testing.agents:noop")})
    engine = Engine(settings)
    samples = []
    async with engine.running():
        for i in range(n + 20):
            started = time.perf_counter()
            await engine.submit("noop", "x", TaskOptions(delay=3600, scope=str(home)))
            if i >= 20:
                samples.append(time.perf_counter() - started)
    print(f"engine.submit in-process (the durable insert under both): {_ms(samples)}")


async def _tool_calls(params: StdioServerParameters, n: int) -> list[float]:
    samples = []
    async with Client(params) as client:
        for i in range(n + 20):
            started = time.perf_counter()
            result = await client.call_tool(
                "task_async", {"agent_definition": "noop", "prompt": "x", "options": {"delay": "1h"}}
            )
            elapsed = time.perf_counter() - started
            assert not result.is_error, result.content
            if i >= 20:
                samples.append(elapsed)
    return samples


async def bench_front(home: Path, n: int) -> None:
    _cli(home, "serve", "--detach")
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "sidequest.cli", "stdio"], env=_env(home), cwd=str(home)
    )
    print(f"task_async via stdio front -> daemon: {_ms(await _tool_calls(params, n))}")


async def bench_embedded(home: Path, n: int) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "sidequest.cli", "stdio", "--embedded"],
        env=_env(home),
        cwd=str(home),
    )
    print(f"task_async via stdio --embedded (no daemon): {_ms(await _tool_calls(params, n))}")


def bench_cold(root: Path, runs: int = 5) -> None:
    samples = []
    for i in range(runs):
        home = root / f"cold{i}"
        samples.append(_cli(home, "serve", "--detach"))
        _cli(home, "stop")
    print(f"cold start (serve --detach until healthy, fresh data dir): {_ms(samples)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--only", choices=["rest", "front", "embedded", "cold"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sidequest-daemon-bench-") as tmp:
        root = Path(tmp)
        try:
            if args.only in (None, "rest"):
                anyio.run(bench_submit, root / "submit", args.n)
                anyio.run(bench_rest, root / "rest", args.n)
            if args.only in (None, "front"):
                anyio.run(bench_front, root / "front", args.n)
            if args.only in (None, "embedded"):
                anyio.run(bench_embedded, root / "embedded", args.n)
            if args.only in (None, "cold"):
                bench_cold(root)
        finally:
            for home in root.iterdir():
                if read_state(home) is not None:
                    _cli(home, "stop")


if __name__ == "__main__":
    main()
