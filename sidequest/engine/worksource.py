"""Where the dispatcher's work comes from.

On the owned store (DuckDB) the engine makes every state change, so the queue is exact in memory:
a submit hands its task to a free slot the moment its insert has committed (`MemoryQueue`, the
dispatcher's own heaps). On a shared store (PostgreSQL) other processes submit, cancel and take
work too, so nothing in memory can be trusted to be ready: a worker claims rows in the database
when it has free slots (`ClaimingQueue`), woken by the store's announcements and, for lost
announcements and delayed tasks, by a short poll.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

from sidequest.engine.dispatcher import Dispatcher
from sidequest.storage.base import ClaimRequest, SharedStore, StoreError, TaskRecord

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
"""A claiming worker looks again at least this often: a delayed task comes due, or a wake-up was
lost (a NOTIFY is not delivered to a listener that was reconnecting)."""


class WorkSource(Protocol):
    def submitted(self, task: TaskRecord) -> None:
        """A task this process just made durable (submit, schedule, retry)."""
        ...

    def wake(self) -> None:
        """Something may be ready (another process's work, a slot came free)."""
        ...

    async def run(self) -> None: ...


class MemoryQueue:
    """The owned store's queue: the dispatcher's heaps, fed directly."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    def submitted(self, task: TaskRecord) -> None:
        self._dispatcher.enqueue(task)

    def wake(self) -> None:
        self._dispatcher.wake()

    async def run(self) -> None:
        await anyio.sleep(math.inf)  # the dispatcher's own loop does the work


class ClaimingQueue:
    """A shared store's queue: claim as many tasks as there are free slots, hand them over."""

    def __init__(
        self,
        store: SharedStore,
        dispatcher: Dispatcher,
        request: Callable[[int], ClaimRequest],
        claimed: Callable[[TaskRecord], bool],
        give_back: Callable[[TaskRecord], Awaitable[None]],
    ) -> None:
        """`claimed` starts a claimed task (False: the pool stopped meanwhile); `give_back` puts
        such a task back in the queue."""
        self._store = store
        self._dispatcher = dispatcher
        self._request = request
        self._claimed = claimed
        self._give_back = give_back
        self._wake = anyio.Event()

    def submitted(self, task: TaskRecord) -> None:
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        backoff = 0.1
        while True:
            self._wake = anyio.Event()
            free = self._dispatcher.free_slots()
            got = 0
            if free > 0:
                try:
                    tasks = await self._store.claim(self._request(free))
                except StoreError as exc:  # the store retries inside; this is the one that gave up
                    log.warning("could not claim work: %s; trying again in %.1fs", exc, backoff)
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.1
                got = len(tasks)
                refused = [task for task in tasks if not self._claimed(task)]
                if refused:  # claimed while this worker stopped, or while its cancelled attempt winds down
                    with anyio.CancelScope(shield=True):
                        for task in refused:
                            await self._give_back(task)
                    await anyio.sleep(POLL_SECONDS)  # not straight back to the task just given back
                    continue
            if got and got == free:
                continue  # there may be more: claim again as soon as slots free up
            with anyio.move_on_after(POLL_SECONDS):
                await self._wake.wait()
