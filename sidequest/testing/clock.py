"""A clock tests move by hand, for the scheduler's calendar cases (DST, a week of downtime)."""

from __future__ import annotations

from datetime import datetime, timedelta

import anyio


class ManualClock:
    """`now()` is whatever the test last set; sleepers wake when it passes their deadline."""

    def __init__(self, now: datetime) -> None:
        self._now = now
        self._moved = anyio.Event()

    def now(self) -> datetime:
        return self._now

    def set(self, now: datetime) -> None:
        self._now = now
        self._moved.set()
        self._moved = anyio.Event()

    def advance(self, delta: timedelta) -> None:
        self.set(self._now + delta)

    async def sleep_until(self, deadline: datetime, wake: anyio.Event) -> None:
        while self._now < deadline and not wake.is_set():
            moved = self._moved
            async with anyio.create_task_group() as tg:

                async def wait(event: anyio.Event) -> None:
                    await event.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(wait, moved)
                tg.start_soon(wait, wake)
