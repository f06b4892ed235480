"""Bounded memory: one byte limit per request, a cap on unfinished tasks, and large queued
prompts that wait on disk instead of in the daemon's memory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
from test_disk_full import client, start_daemon
from test_engine import running_engine, wait_status

from sidequest.engine.errors import InvalidRequest, QueueFull
from sidequest.models import TaskOptions, TaskStatus


async def test_one_limit_for_the_whole_request(tmp_path: Path) -> None:
    async with running_engine(tmp_path, max_request_bytes=100_000) as engine:
        before = await engine.store.count_rows()
        for options in (
            TaskOptions(metadata={"blob": "x" * 120_000}),
            TaskOptions(metadata={f"k{i}": "v" * 1000 for i in range(110)}),
        ):
            with pytest.raises(InvalidRequest, match="max_request_bytes") as caught:
                await engine.submit("echo", "small prompt", options)
            assert "over the 100000-byte limit" in str(caught.value)
        with pytest.raises(InvalidRequest, match="max_request_bytes"):
            await engine.submit("echo", "p" * 60_000, TaskOptions(metadata={"m": "x" * 50_000}))
        assert await engine.store.count_rows() == before, "a refused submit writes nothing"
        ok = await engine.submit("echo", "p" * 40_000, TaskOptions(metadata={"m": "x" * 40_000}))
        await wait_status(engine, ok.task_id, TaskStatus.completed)


async def test_queue_cap_refuses_with_queue_full(tmp_path: Path) -> None:
    async with running_engine(tmp_path, max_queued_tasks=3) as engine:
        engine.dispatcher.accepting = False  # nothing starts: every task stays queued
        ids = [(await engine.submit("echo", f"task {i}")).task_id for i in range(3)]
        with pytest.raises(QueueFull, match=r"queue full: 3 tasks are unfinished.*max_queued_tasks"):
            await engine.submit("echo", "one too many")
        await engine.cancel(task_id=ids[0])
        fourth = await engine.submit("echo", "room again")  # a finished task makes room
        assert fourth.task_id not in ids


async def test_large_queued_prompts_wait_on_disk_and_still_run(tmp_path: Path) -> None:
    big = [f"{i} " + "x" * 50_000 for i in range(5)]
    async with running_engine(tmp_path) as engine:
        engine.dispatcher.accepting = False
        ids = [(await engine.submit("echo", prompt)).task_id for prompt in big]
    # Restarted with five 50 kB prompts queued: loaded without their prompts...
    async with running_engine(tmp_path) as engine:
        held = [engine._live[t].prompt for t in ids]
        assert held == [None] * 5, "large queued prompts are not loaded into memory at start"
        # ...which are read from disk when their attempt starts.
        for task_id, prompt in zip(ids, big, strict=True):
            await wait_status(engine, task_id, TaskStatus.completed)
            page = await engine.get_result(task_id, max_chars=100_000)
            assert page.content == prompt


@pytest.fixture
def daemon_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "test.toml").write_text(
        'max_request_bytes = 100000\n[agents.echo]\ncallable = "sidequest.testing.agents:echo"\n',
        encoding="utf-8",
    )
    daemon = start_daemon(home)
    try:
        yield home
    finally:
        with suppress(ProcessLookupError):
            daemon.kill()
        daemon.wait(timeout=10)


@pytest.mark.slow
def test_daemon_refuses_oversized_bodies_before_parsing(daemon_home: Path) -> None:
    with client(daemon_home) as http:
        huge = http.post(
            "/tasks",
            content=b'{"agent_definition": "echo", "prompt": "' + b"x" * 2_000_000 + b'"}',
            headers={"Content-Type": "application/json"},
        )
        assert huge.status_code == 413, huge.text
        assert huge.json()["code"] == "too_large" and "max_request_bytes" in huge.json()["message"]
        meta = http.post(
            "/tasks",
            json={"agent_definition": "echo", "prompt": "x", "options": {"metadata": {"m": "y" * 150_000}}},
        )
        assert meta.status_code == 400 and "max_request_bytes" in meta.json()["message"], meta.text
        assert http.get("/workflows", params={"all_scopes": True}).json()["total"] == 0
        assert http.post("/tasks", json={"agent_definition": "echo", "prompt": "fine"}).status_code == 201
