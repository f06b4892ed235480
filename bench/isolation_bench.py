"""What `isolation = "process"` costs a python agent, against `inline`.

    .venv/bin/python -m bench.isolation_bench [--n N] [--drain N]

- floor: `python -P -c pass`, the interpreter's own start and exit;
- attempt: one `executor.run` of a callable that returns at once, called
  directly (no engine, no store), sequentially: the per-attempt overhead of a
  fresh interpreter (spawn, imports, frames, exit, group stop) for a sync and
  an async callable, next to inline (thread / event loop);
- with sidequest imported: the same for a callable whose module imports
  sidequest (as one that raises PermanentError or records usage does);
- drain: N sync no-op tasks queued in a real engine, then run at
  max_concurrency 4 until the dispatcher is idle, tasks/s;
- memory: resident size of one idle child (a sync callable sleeping).
This file only measures; it changes nothing in sidequest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import psutil

from bench.engine_bench import open_gate
from sidequest.config import AgentConfig, Settings
from sidequest.engine.engine import Engine
from sidequest.executors.base import TaskContext
from sidequest.executors.python import PythonExecutor
from sidequest.executors.python_process import ProcessPythonExecutor
from sidequest.models import TaskOptions, TaskStatus


def _ms(samples: list[float]) -> str:
    samples = sorted(samples)
    p90 = samples[min(len(samples) - 1, int(len(samples) * 0.9))]
    return f"p50 {statistics.median(samples) * 1000:7.2f} ms, p90 {p90 * 1000:7.2f} ms (n={len(samples)})"


def _ctx(attempt: int) -> TaskContext:
    return TaskContext(
        task_id=f"t_bench{attempt}",
        workflow_id="w_bench",
        agent="bench",
        attempt=attempt,
        scope="/",
        metadata={},
        _on_progress=lambda percent, message: None,
        _on_usage=lambda usage: None,
    )


def _write_stdlib_agents(folder: Path) -> None:
    """Callables whose module imports nothing from sidequest: the child's own floor."""
    (folder / "bench_plain_agents.py").write_text(
        "def noop_sync(prompt, ctx):\n    return None\n\n"
        "async def noop_async(prompt, ctx):\n    return None\n\n"
        "def idle(prompt, ctx):\n    import time\n    time.sleep(float(prompt))\n",
        encoding="utf-8",
    )


async def bench_interpreter(n: int) -> None:
    """The floor: starting and ending the same interpreter with nothing to do."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        process = await anyio.open_process([sys.executable, "-P", "-c", "pass"])
        await process.wait()
        await process.aclose()
        samples.append(time.perf_counter() - start)
    print(f"floor    {'python -P -c pass':32} {'':8} {_ms(samples)}")


async def bench_attempts(n: int) -> None:
    cases = [
        ("sync, stdlib-only module", "bench_plain_agents:noop_sync"),
        ("async, stdlib-only module", "bench_plain_agents:noop_async"),
        ("sync, module imports sidequest", "sidequest.testing.agents:echo_sync"),
        ("async, module imports sidequest", "sidequest.testing.agents:noop"),
    ]
    for label, spec in cases:
        executors: dict[str, Any] = {
            "inline": PythonExecutor(spec),
            "process": ProcessPythonExecutor("bench", AgentConfig(callable=spec, isolation="process")),
        }
        for isolation, executor in executors.items():
            await executor.run("x", _ctx(0))  # warm: imports, thread pool, page cache
            samples = []
            for i in range(n):
                start = time.perf_counter()
                await executor.run("x", _ctx(i + 1))
                samples.append(time.perf_counter() - start)
            print(f"attempt  {label:32} {isolation:8} {_ms(samples)}")


async def bench_drain(home: Path, n: int) -> None:
    for isolation in ("inline", "process"):
        agents = {"noop": AgentConfig(callable="bench_plain_agents:noop_sync", isolation=isolation)}
        settings = Settings(home=home / isolation, agents=agents, max_concurrency=4)
        engine = Engine(settings)
        async with engine.running():
            engine.dispatcher.accepting = False  # gate: submits are recorded and queued, nothing starts
            ids = [(await engine.submit("noop", "x", TaskOptions())).task_id for _ in range(n)]
            start = time.perf_counter()
            open_gate(engine)
            while engine.dispatcher.running or engine.dispatcher.queued_count():
                await anyio.sleep(0.002)
            elapsed = time.perf_counter() - start
            statuses = {(await engine.get_task(task_id, history=False)).status for task_id in ids}
            assert statuses == {TaskStatus.completed}, statuses
        print(f"drain    {n} sync no-op tasks, concurrency 4, {isolation:8} {n / elapsed:8.1f} tasks/s")


async def bench_memory() -> None:
    executor = ProcessPythonExecutor("bench", AgentConfig(callable="bench_plain_agents:idle"))
    me = psutil.Process()
    sizes: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(executor.run, "1.5", _ctx(1))
        await anyio.sleep(1.0)
        sizes = [child.memory_info().rss for child in me.children()]
    rss = f"{sizes[0] / 2**20:.1f} MiB" if sizes else "(no child found)"
    print(f"memory   one idle child (stdlib-only module): RSS {rss}")


async def main_async(n: int, drain: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_stdlib_agents(root)
        sys.path.insert(0, str(root))
        await bench_interpreter(n)
        await bench_attempts(n)
        await bench_memory()
        await bench_drain(root, drain)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50, help="sequential attempts per case")
    parser.add_argument("--drain", type=int, default=200, help="tasks per drain")
    args = parser.parse_args()
    anyio.run(main_async, args.n, args.drain)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
