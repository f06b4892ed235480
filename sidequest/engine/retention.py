"""Retention: finished tasks older than the `retention` setting are deleted, with everything that
hangs off them, so the database does not grow forever.

What goes: tasks that are completed, failed or cancelled and finished longer ago than the age;
their attempts, results, usage rows, notifications, webhook deliveries and schedule fire keys;
and workflows none of whose tasks remain. What stays: every unfinished task, any task the engine
still holds (a cancelled task whose attempt is still winding down), schedules (they are live
configuration), and the newest notification (the cursor is read from it at start).

Why it is shaped like this: DuckDB aborts a transaction when two writers touch one row and can
silently lose an update that races a delete of its row, so the deletes run on the store's single
writer, in bounded batches (a group commit, and so a submit, waits for one batch at most), and
never touch a row with writes still queued. After a purge the store checkpoints: the deleted rows'
blocks become free for new rows. The file itself does not shrink unless the free blocks are at its
end (DuckDB has no online compaction; VACUUM and FORCE CHECKPOINT free nothing more). So retention
bounds the file at roughly the size of `retention`'s worth of tasks; it does not make it smaller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import asdict
from datetime import datetime, timedelta

import anyio

from sidequest.config import Settings
from sidequest.engine.errors import InvalidRequest
from sidequest.models import MAX_AGE_SECONDS, GcCounts, GcReport, utcnow
from sidequest.storage.base import PurgeCounts, Store

log = logging.getLogger(__name__)

BATCH_SIZE = 500
"""Tasks per delete transaction. Most of a batch's time is its commit, which costs ~50 µs per deleted
row of a table with a primary key (tasks, results, workflows). bench/retention_bench.py, 100,000
tasks in the store: a batch of 500 holds the writer p50 0.18 s, p99 0.39 s (1,000: p50 0.32 s). A
submit that arrives during a purge waits for the batch in progress (group commits go first between
batches)."""
MIN_INTERVAL = 60.0
MAX_INTERVAL = 6 * 3600.0


def pass_interval(retention: float) -> float:
    """A tenth of the retention age, between a minute and six hours: a task outlives its age by
    at most a tenth, and a short age does not keep the writer busy."""
    return min(max(retention / 10, MIN_INTERVAL), MAX_INTERVAL)


def describe_age(seconds: float) -> str:
    """'30d', '12h', '90m', '45s': how a person would have typed it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


class Retention:
    """Deletes finished tasks past their age: at start and periodically in the daemon, or on request.

    `held()` names tasks that must not be deleted whatever the store says (the engine's live and
    running tasks); `now()` is the time ages are measured from (UTC, the clock that stamps
    `finished_at`).
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        held: Callable[[], Collection[str]] = frozenset,
        now: Callable[[], datetime] = utcnow,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.store = store
        self.settings = settings
        self._held = held
        self._now = now
        self.batch_size = batch_size
        self._lock = anyio.Lock()  # a pass by hand and the periodic one take turns
        self._changed = anyio.Event()

    def reconfigure(self, settings: Settings) -> None:
        """A reloaded configuration: a changed age starts a pass now and sets the next interval;
        "off" stops the passes, and an age after "off" starts them again."""
        before = self.settings.retention
        self.settings = settings
        if settings.retention != before:
            self._changed.set()

    async def run(self, interval: float | None = None) -> None:
        """The daemon's loop: one pass at start, then one every `interval` seconds (default
        `pass_interval(retention)`), or at once when a reload changes the age. Waits while
        retention is off. A failed pass is logged and tried again next time: losing a pass costs
        disk space, not data."""
        while True:
            self._changed = anyio.Event()
            if self.settings.retention is None:
                log.info("retention is off: finished tasks are kept forever")
                await self._changed.wait()
                continue
            period = interval if interval is not None else pass_interval(self.settings.retention)
            try:
                report = await self.collect()
            except Exception:
                log.exception("retention pass failed; trying again in %s", describe_age(period))
            else:
                if report.deleted.tasks or report.deleted.notifications:
                    log.info("retention: %s", summary(report))
            with anyio.move_on_after(period):
                await self._changed.wait()

    async def collect(
        self, older_than: float | None = None, dry_run: bool = False, now: datetime | None = None
    ) -> GcReport:
        """Delete (with `dry_run`, count) finished tasks older than `older_than` seconds, default
        the `retention` setting, measured back from `now` (default the current time)."""
        age = older_than if older_than is not None else self.settings.retention
        if age is None:
            raise InvalidRequest(
                'retention is off (retention = "off" in the config); say how old finished tasks must '
                "be to go, e.g. older_than '30d'"
            )
        if not 0 < age <= MAX_AGE_SECONDS:
            raise InvalidRequest(
                f"older_than must be more than 0 and at most {MAX_AGE_SECONDS / 86400:g} days, got {age:g}s"
            )
        async with self._lock:
            started = time.monotonic()
            before = (now or self._now()) - timedelta(seconds=age)
            usage_before = await self.store.disk_usage()
            if dry_run:
                counts = await self.store.count_finished(before, self._held())
                batches, checkpointed, usage_after = 0, False, usage_before
            else:
                counts, batches = await self.store.purge_finished(before, self._held, self.batch_size)
                checkpointed = await self.store.checkpoint() if batches else False
                usage_after = await self.store.disk_usage()
        return GcReport(
            dry_run=dry_run,
            older_than_seconds=age,
            finished_before=before,
            deleted=_counts(counts),
            batches=batches,
            file_bytes_before=usage_before.file_bytes,
            wal_bytes_before=usage_before.wal_bytes,
            file_bytes_after=usage_after.file_bytes,
            wal_bytes_after=usage_after.wal_bytes,
            free_bytes_after=usage_after.free_bytes,
            checkpointed=checkpointed,
            seconds=round(time.monotonic() - started, 3),
        )


def _counts(counts: PurgeCounts) -> GcCounts:
    return GcCounts(**asdict(counts))


def summary(report: GcReport) -> str:
    """One line for the log."""
    d = report.deleted
    verb = "would delete" if report.dry_run else "deleted"
    return (
        f"{verb} {d.tasks} task(s) finished more than {describe_age(report.older_than_seconds)} ago "
        f"({d.attempts} attempts, {d.results} results, {d.usage} usage rows, {d.notifications} "
        f"notifications, {d.schedule_fires} schedule fires, {d.workflows} workflows, {d.events} log "
        "entries) in "
        f"{report.batches} batch(es), {report.seconds:g}s; file + WAL {report.file_bytes_before} + "
        f"{report.wal_bytes_before} -> {report.file_bytes_after} + {report.wal_bytes_after} bytes, "
        f"{report.free_bytes_after} free in the file"
    )
