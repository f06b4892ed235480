"""The executor pool: ready queue, delayed queue, concurrency limits, one attempt at a time per task.

Dispatch is event-driven: a submit, a finished attempt or a due delay wakes
the loop; there is no fixed-interval polling. The store is single-owner, so
the queue lives in memory and the database is its durable copy: a task is
handed to a free slot as soon as its insert has committed, and its `running`
mark rides the next group commit.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import anyio
from anyio.abc import TaskGroup

from sidequest.executors.base import TaskContext
from sidequest.models import PRIORITY_RANK, utcnow
from sidequest.storage.base import TaskRecord


@dataclass
class RunningAttempt:
    task: TaskRecord
    ctx: TaskContext
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stop_reason: str | None = None  # "cancelled" | "shutdown" | "store_failed"


_READY = ("queued", "retrying")


class Dispatcher:
    def __init__(
        self,
        max_concurrency: int,
        agent_limit: Callable[[str], int | None],
        start_attempt: Callable[[TaskRecord], RunningAttempt],
        run_attempt: Callable[[RunningAttempt], Awaitable[None]],
        is_ready: Callable[[str], TaskRecord | None],
    ) -> None:
        self.max_concurrency = max_concurrency
        self._agent_limit = agent_limit
        self._start_attempt = start_attempt
        self._run_attempt = run_attempt
        self._is_ready = is_ready
        self._ready: list[tuple[int, int, str]] = []
        self._delayed: list[tuple[datetime, int, str]] = []
        self._blocked: dict[str, deque[tuple[int, int, str]]] = defaultdict(deque)
        self.running: dict[str, RunningAttempt] = {}
        self._per_agent: dict[str, int] = defaultdict(int)
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self.accepting = True
        self.slot_freed: Callable[[], None] | None = None
        """Called when an attempt ends (a claiming queue claims again)."""
        self._tg: TaskGroup | None = None
        self._suspect_running = False
        self._suspects: deque[tuple[int, int, str]] = deque()
        """Quarantine: a task present at a process death (lost_attempts > 0) runs with nothing
        beside it, so if it kills the process again the death is counted against it alone, and
        healthy tasks are never failed for sitting next to a poisonous one."""

    # ---- queueing --------------------------------------------------------

    def enqueue(self, task: TaskRecord) -> None:
        due = task.next_attempt_at if task.status == "retrying" else task.not_before
        if due is not None and due > utcnow():
            heapq.heappush(self._delayed, (due, task.seq, task.id))
        else:
            heapq.heappush(self._ready, (PRIORITY_RANK[task.priority], task.seq, task.id))
        self._wake.set()

    def wake(self) -> None:
        """Look at the slots again (more may be free after `max_concurrency` was raised)."""
        self._wake.set()

    def free_slots(self) -> int:
        """Attempts that could start now (a claiming queue asks for this many)."""
        if not self.accepting or self._tg is None:
            return 0
        return max(0, self.max_concurrency - len(self.running))

    def start_claimed(self, task: TaskRecord) -> bool:
        """Start a task a shared store's claim gave this worker (limits were counted in the claim).
        False when the pool stopped meanwhile (a claim in flight at shutdown): not started."""
        if not self.accepting or self._tg is None:
            return False
        self._start(self._tg, task)
        return True

    def queued_count(self) -> int:
        blocked = sum(len(q) for q in self._blocked.values())
        return len(self._ready) + len(self._delayed) + len(self._suspects) + blocked

    # ---- the loop --------------------------------------------------------

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                while True:
                    self._promote_due()
                    self._fill_slots(tg)
                    timeout = self._until_next_due()
                    with anyio.move_on_after(timeout):
                        await self._wake.wait()
                    self._wake = anyio.Event()
            finally:
                self._tg = None  # nothing can start in it any more

    def _promote_due(self) -> None:
        if not self._delayed:
            return
        now = utcnow()
        while self._delayed and self._delayed[0][0] <= now:
            _, seq, task_id = heapq.heappop(self._delayed)
            task = self._is_ready(task_id)
            if task is not None:
                heapq.heappush(self._ready, (PRIORITY_RANK[task.priority], seq, task_id))

    def _until_next_due(self) -> float:
        if not self._delayed:
            return math.inf
        return max(0.0, (self._delayed[0][0] - utcnow()).total_seconds())

    def _fill_slots(self, tg: TaskGroup) -> None:
        while self.accepting and len(self.running) < self.max_concurrency:
            if self._suspect_running:
                return  # a task that was running when the process died runs alone
            if self._suspects:
                # Suspects go first, whatever arrives meanwhile (else a stream of high-priority
                # work would starve them); nothing new starts until the pool is empty.
                if self.running:
                    return
                entry = self._suspects.popleft()
                task = self._is_ready(entry[2])
                if task is not None:
                    self._start(tg, task)
                continue
            if not self._ready:
                return
            entry = heapq.heappop(self._ready)
            task = self._is_ready(entry[2])
            if task is None:
                continue  # cancelled while queued
            if task.lost_attempts:
                self._suspects.append(entry)
                continue
            limit = self._agent_limit(task.agent)
            if limit is not None and self._per_agent[task.agent] >= limit:
                self._blocked[task.agent].append(entry)
                continue
            self._start(tg, task)

    def _start(self, tg: TaskGroup, task: TaskRecord) -> None:
        attempt = self._start_attempt(task)
        self._suspect_running = bool(task.lost_attempts)
        self.running[task.id] = attempt
        self._per_agent[task.agent] += 1
        self._idle = anyio.Event()
        tg.start_soon(self._guarded, attempt)

    async def _guarded(self, attempt: RunningAttempt) -> None:
        try:
            await self._run_attempt(attempt)
        finally:
            task = attempt.task
            self.running.pop(task.id, None)
            self._suspect_running = False
            self._per_agent[task.agent] -= 1
            blocked = self._blocked.get(task.agent)
            while blocked:
                heapq.heappush(self._ready, blocked.popleft())
            if not self.running:
                self._idle.set()
            self._wake.set()
            if self.slot_freed is not None:
                self.slot_freed()

    # ---- stopping --------------------------------------------------------

    async def drain(self, grace: float) -> list[str]:
        """Stop starting work; let running attempts finish for `grace` seconds, then stop them.

        Returns the ids of tasks that were stopped (the engine puts them back in the queue).
        """
        self.accepting = False
        with anyio.move_on_after(grace):
            await self._idle.wait()
        stopped = list(self.running)
        for attempt in list(self.running.values()):
            attempt.stop_reason = "shutdown"
            attempt.ctx._cancel()
            attempt.scope.cancel()
        with anyio.move_on_after(5):
            await self._idle.wait()
        return stopped

    def stop_all(self, reason: str) -> None:
        """Stop every running attempt now (the store failed: nothing they do can be kept)."""
        for attempt in list(self.running.values()):
            attempt.stop_reason = reason
            attempt.ctx._cancel()
            attempt.scope.cancel()

    def cancel_running(self, task_id: str) -> bool:
        attempt = self.running.get(task_id)
        if attempt is None:
            return False
        attempt.stop_reason = "cancelled"
        attempt.ctx._cancel()
        attempt.scope.cancel()
        return True
