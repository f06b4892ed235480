"""What agent files cost on the submit path, and what an anthropic task costs end to end against the fake.

    .venv/bin/python -m bench.agents_bench [--files N] [--n N]

- resolve: `AgentRegistry.resolve` of a config agent, and of a file agent in a
  project folder holding N agent files (files are listed and stat'ed on every
  lookup, parsed only when they change);
- submit: `engine.submit` p50 for a config agent and for a file agent (tasks
  delayed an hour, so only the submit is measured);
- anthropic: tasks through the anthropic executor against the fake Messages
  API on 127.0.0.1 (real SDK, real HTTP, streaming), submit to completed.
This file only measures; it changes nothing in sidequest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from sidequest.agents import AgentRegistry
from sidequest.config import AgentConfig, AnthropicConfig, Settings
from sidequest.engine.engine import Engine
from sidequest.models import TaskOptions, TaskStatus
from sidequest.testing.fake_anthropic import FakeAnthropic


def _ms(samples: list[float]) -> str:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"p50 {statistics.median(samples) * 1000:.3f} ms, p99 {p99 * 1000:.3f} ms (n={len(samples)})"


def _project(root: Path, files: int) -> Path:
    agents = root / "project" / ".claude" / "agents"
    agents.mkdir(parents=True)
    for i in range(files):
        (agents / f"agent{i:03d}.md").write_text(
            f"---\nname: agent{i:03d}\ndescription: agent number {i}\nmodel: haiku\n---\nYou are agent {i}.\n"
        )
    return root / "project"


def _settings(root: Path, fake: FakeAnthropic | None = None) -> Settings:
    return Settings(
        home=root / "home",
        user_agent_dir=root / "no-user-agents",
        agents={"echo": AgentConfig(callable="sidequest.testing.agents:echo")},
        anthropic=AnthropicConfig(base_url=fake.base_url) if fake else AnthropicConfig(),
        max_concurrency=8,
    )


def bench_resolve(root: Path, files: int, n: int) -> None:
    project = _project(root, files)
    registry = AgentRegistry.from_settings(_settings(root))
    last = f"agent{files - 1:03d}"
    registry.resolve(last, str(project))  # first parse
    for name in ("echo", last):
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            registry.resolve(name, str(project))
            samples.append(time.perf_counter() - start)
        kind = "config agent" if name == "echo" else f"file agent (last of {files} files)"
        print(f"resolve {kind}: {_ms(samples)}")


async def bench_submit_and_anthropic(root: Path, files: int, n: int) -> None:
    project = _project(root, files)
    with FakeAnthropic() as fake:
        os.environ["ANTHROPIC_API_KEY"] = fake.api_key
        engine = Engine(_settings(root, fake))
        async with engine.running():
            options = TaskOptions(scope=str(project))
            later = TaskOptions(scope=str(project), delay=3600)  # measure submit alone, not the runs
            for name in ("echo", "agent000"):
                samples = []
                for _ in range(n):
                    start = time.perf_counter()
                    await engine.submit(name, "hello", later)
                    samples.append(time.perf_counter() - start)
                print(f"engine.submit {name!r}: {_ms(samples)}")
            ids = [t.task_id for t in [await engine.submit("agent000", "hi", options) for _ in range(n)]]
            with anyio.fail_after(120):
                while True:
                    infos = [await engine.get_task(i, history=False) for i in ids]
                    if all(i.status == TaskStatus.completed for i in infos):
                        break
                    await anyio.sleep(0.05)
            spans = [(i.finished_at - i.created_at).total_seconds() for i in infos]  # type: ignore[operator]
            print(f"anthropic task via fake, submit→completed (8 at a time): {_ms(spans)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_resolve(Path(tmp) / "resolve", args.files, args.n)
        anyio.run(bench_submit_and_anthropic, Path(tmp) / "submit", args.files, args.n)


if __name__ == "__main__":
    main()
