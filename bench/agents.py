"""Bench-local agents, referenced from Settings as `bench.agents:NAME`."""

from __future__ import annotations

import time

from sidequest.executors.base import TaskContext

STARTS: dict[str, float] = {}
"""prompt -> time.perf_counter() at the moment the agent callable started."""


async def stamp(prompt: str, ctx: TaskContext) -> None:
    """Records when the executor started it (keyed by prompt), then returns at once."""
    STARTS[prompt] = time.perf_counter()
