"""Cron schedules: validation, fire times across time zones and DST, and the loop that fires them.

Every decision about a due time is durable before it has effects: a run's task, its fire key
(schedule id + due time, a primary key) and the schedule's new state commit in one
transaction, and schedule rows change only if nobody changed them since they were read
(`updated_at`). So a restart, or two schedulers on one store, never fire a due time twice, and
a scheduler that lost a race just reads again.

The loop does not poll: it sleeps until the earliest `next_run_at` (an index read) or until
something changes (a schedule written, a scheduled task finishing), whichever comes first.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
from croniter import croniter
from croniter.croniter import CroniterError

from sidequest.agents import Agent
from sidequest.config import ScheduleConfig, Settings
from sidequest.engine.errors import EngineError, InvalidRequest, NotFound
from sidequest.models import (
    NotificationKind,
    ScheduleCreated,
    ScheduleDeleted,
    ScheduleInfo,
    SchedulePage,
    ScheduleRuns,
    ScheduleSpec,
    ScheduleUpdate,
    TaskInfo,
    TaskOptions,
    TaskStatus,
    utcnow,
)
from sidequest.storage.base import ScheduleRecord, Store, TaskRecord

log = logging.getLogger(__name__)

NEXT_RUNS_SHOWN = 5
DUE_BATCH = 100
STUCK_RETRY = 30.0
"""Seconds before retrying a due schedule whose decision failed (logged each time)."""
MAX_SLEEP = 3600.0
"""Wake at least hourly, so a wall clock stepped forward (suspend, NTP) is noticed."""
_FORBIDDEN_OPTIONS = ("workflow_id", "idempotency_key", "delay", "not_before")
_STORED = ScheduleConfig(allow_seconds=True)


# ---- time ------------------------------------------------------------------------


class Clock(Protocol):
    """What the scheduler needs of time; tests pass a clock they move by hand."""

    def now(self) -> datetime: ...

    async def sleep_until(self, deadline: datetime, wake: anyio.Event) -> None:
        """Return at `deadline` or when `wake` is set, whichever is first."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return utcnow()

    async def sleep_until(self, deadline: datetime, wake: anyio.Event) -> None:
        seconds = min(MAX_SLEEP, (deadline - utcnow()).total_seconds())
        if seconds <= 0:
            return
        with anyio.move_on_after(seconds):
            await wake.wait()


# ---- cron ------------------------------------------------------------------------


CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
"""The usual shorthands; stored expanded, so a schedule reads the same everywhere."""

_FIELD_RANGES = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
)


def _check_ranges(expr: str, fields: list[str]) -> None:
    """Name the field of an out-of-range number ("hour 25 is out of range 0-23"): croniter's own
    message does not say which field it means."""
    named = ((("second", 0, 59),) if len(fields) == 6 else ()) + _FIELD_RANGES
    for (name, low, high), field in zip(named, fields, strict=True):
        for part in field.split(","):
            for number in re.findall(r"\d+", part.split("/")[0]):
                if not low <= int(number) <= high:
                    raise InvalidRequest(f"cron {expr!r}: {name} {int(number)} is out of range {low}-{high}")
            step = part.partition("/")[2]
            if step and (not step.isdigit() or int(step) == 0):
                raise InvalidRequest(
                    f"cron {expr!r}: the {name} step {step!r} must be a whole number above 0"
                )


class Cron:
    """A validated cron expression in a time zone; all times in and out are UTC."""

    def __init__(
        self, expr: str, timezone: str, config: ScheduleConfig, *, check_interval: bool = True
    ) -> None:
        alias = CRON_ALIASES.get(expr.strip().lower())
        fields = (alias or expr).split()
        self.seconds = len(fields) == 6
        if len(fields) not in (5, 6) or (self.seconds and not config.allow_seconds):
            accepted = "5 fields (minute hour day-of-month month day-of-week)"
            if config.allow_seconds:
                accepted += ", or 6 with seconds first"
            accepted += f", or one of {', '.join(CRON_ALIASES)}"
            raise InvalidRequest(f"cron {expr!r} has {len(fields)} fields; expected {accepted}")
        _check_ranges(expr, fields)
        try:
            self.zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: a tzdata folder
            raise InvalidRequest(
                f"unknown time zone {timezone!r}: use an IANA name such as 'UTC', 'Europe/Berlin' "
                "or 'America/New_York'"
            ) from exc
        self.expr = " ".join(fields)
        self.timezone = timezone
        try:
            croniter(self.expr, datetime.now(self.zone), second_at_beginning=self.seconds)
        except (CroniterError, ValueError, KeyError) as exc:
            raise InvalidRequest(f"cron {expr!r} is not valid: {exc}") from exc
        try:
            gap = self._shortest_gap() if check_interval else None
        except (CroniterError, ValueError, OverflowError) as exc:
            raise InvalidRequest(f"cron {expr!r} never fires (no such date): {exc}") from exc
        if gap is not None and gap < config.min_interval:
            raise InvalidRequest(
                f"cron {expr!r} fires every {gap:g}s; the shortest interval allowed is "
                f"{config.min_interval:g}s (schedules.min_interval in the config)"
            )

    def _iter(self, start: datetime) -> croniter:
        return croniter(self.expr, start.astimezone(self.zone), second_at_beginning=self.seconds)

    def next_after(self, after: datetime) -> datetime:
        """The first fire time strictly after `after`.

        croniter yields a wall-clock time twice when DST repeats an hour (01:30 EDT, then 01:30
        EST); cron means it once, so the repeat is skipped.
        """
        it = self._iter(after)
        wall = after.astimezone(self.zone).replace(tzinfo=None)
        for _ in range(4):
            candidate: datetime = it.get_next(datetime)
            if candidate.replace(tzinfo=None) != wall:
                return candidate.astimezone(UTC)
            wall = candidate.replace(tzinfo=None)
        return candidate.astimezone(UTC)

    def latest_at_or_before(self, moment: datetime) -> datetime:
        previous: datetime = self._iter(moment).get_prev(datetime)
        candidate = self.next_after(previous.astimezone(UTC))
        return candidate if candidate <= moment else previous.astimezone(UTC)

    def _shortest_gap(self, samples: int = 12) -> float | None:
        times = []
        moment = utcnow()
        for _ in range(samples):
            moment = self.next_after(moment)
            times.append(moment)
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
        return min(gaps) if gaps else None


# ---- the scheduler ------------------------------------------------------------------


def _new_id() -> str:
    return f"sch_{secrets.token_urlsafe(16)}"


class ScheduleHost(Protocol):
    """What the scheduler needs of the engine that runs it: the engine implements this, and this
    module does not import the engine (the engine builds its scheduler)."""

    store: Store
    settings: Settings

    async def is_unfinished(self, task_id: str) -> bool: ...

    def admit_scope(self, requested: str | None, project: str | None) -> tuple[str, str | None]: ...

    def check_task(self, agent: str, prompt: str, options: TaskOptions, project: str | None) -> Agent: ...

    async def task_statuses(self, task_ids: list[str]) -> dict[str, str]: ...

    def task_info(self, task: TaskRecord) -> TaskInfo: ...

    def notify_schedule(
        self, kind: NotificationKind, schedule: ScheduleRecord, message: str, task_id: str | None
    ) -> None: ...

    async def fire_scheduled(
        self, schedule: ScheduleRecord, due: datetime, after: ScheduleRecord, expected: datetime
    ) -> str | None: ...


class Scheduler:
    """Schedules' API (create, list, update, delete, runs) and the loop that fires them."""

    def __init__(self, engine: ScheduleHost, clock: Clock | None = None) -> None:
        self.engine = engine
        self.store = engine.store
        self.config = engine.settings.schedules
        self.clock: Clock = clock or SystemClock()
        self._wake = anyio.Event()
        self._lock = anyio.Lock()
        self._crons: dict[tuple[str, str], Cron] = {}
        self._stuck = False
        self.waiting = False
        """A queued run (overlap=queue) waits for its predecessor to finish: the last pass said so."""

    # ---- the loop ----------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake = anyio.Event()
            try:
                await self.run_due()
                next_due = await self.store.next_due()
            except Exception:
                log.exception("scheduler pass failed; trying again in a minute")
                next_due = self.clock.now() + timedelta(seconds=60)
            deadline = next_due or self.clock.now() + timedelta(seconds=MAX_SLEEP)
            if self._stuck:  # due but undecidable (logged): never spin on it
                deadline = max(deadline, self.clock.now() + timedelta(seconds=STUCK_RETRY))
            await self.clock.sleep_until(deadline, self._wake)

    async def run_due(self) -> int:
        """Decide every due time that has come; returns how many runs were started."""
        started = 0
        async with self._lock:
            while True:
                now = self.clock.now()
                due = await self.store.due_schedules(now, DUE_BATCH)
                progressed = False
                self._stuck = False
                self.waiting = False
                for schedule in due:
                    try:
                        outcome = await self._decide(schedule, now)
                    except Exception:  # one broken row must not stop every other schedule
                        log.exception("schedule %s: cannot decide its due run; retrying later", schedule.id)
                        self._stuck = True
                        continue
                    started += outcome == "fired"
                    self.waiting |= outcome == "waiting"
                    progressed |= outcome not in ("waiting", "raced")
                if len(due) < DUE_BATCH or not progressed:
                    return started

    async def _decide(self, s: ScheduleRecord, now: datetime) -> str:
        """One step for one schedule: fire, skip, queue, finish, or wait (a queued run's predecessor)."""
        cron = self._stored_cron(s)
        if s.queued_run_at is not None and (s.next_run_at is None or s.next_run_at > now):
            if await self._running(s):
                return "waiting"
            return await self._fire(s, s.queued_run_at, now, replace(s, queued_run_at=None))
        assert s.next_run_at is not None
        due = s.next_run_at
        if s.end_at is not None and due > s.end_at:
            return await self._save(s, replace(s, next_run_at=None, finished_at=now), "finished")
        late = (now - due).total_seconds() > self.config.misfire_grace
        if late:
            latest = cron.latest_at_or_before(now)
            upcoming = self._upcoming(cron, s, now)
            if s.misfire == "skip":
                self._notify(
                    s,
                    NotificationKind.schedule_skipped,
                    f"schedule {s.name!r} ({s.id}) missed its run(s) since {due.isoformat()} while sidequest "
                    f"was down; misfire=skip, next run {upcoming.isoformat() if upcoming else 'none'}",
                )
                finished = now if upcoming is None else None
                return await self._save(s, replace(s, next_run_at=upcoming, finished_at=finished), "skipped")
            due = max(latest, due)  # one catch-up run, keyed by the latest missed time
        else:
            upcoming = self._upcoming(cron, s, due)
            if upcoming is not None and upcoming <= now:  # several due at once: only the last counts
                upcoming = self._upcoming(cron, s, now)
        after = replace(s, next_run_at=upcoming)
        if await self._running(s):
            if s.overlap == "skip":
                self._notify(
                    s,
                    NotificationKind.schedule_skipped,
                    f"schedule {s.name!r} ({s.id}) skipped its {due.isoformat()} run: task {s.last_task_id} "
                    "is still running (overlap=skip)",
                )
                finished = now if upcoming is None else None
                return await self._save(s, replace(after, finished_at=finished), "skipped")
            if s.overlap == "queue":
                queued = s.queued_run_at or due
                return await self._save(s, replace(after, queued_run_at=queued), "queued")
        return await self._fire(s, due, now, after)

    def _upcoming(self, cron: Cron, s: ScheduleRecord, after: datetime) -> datetime | None:
        start = max(after, s.start_at - timedelta(microseconds=1)) if s.start_at else after
        upcoming = cron.next_after(start)
        if s.end_at is not None and upcoming > s.end_at:
            return None
        return upcoming

    async def _running(self, s: ScheduleRecord) -> bool:
        return s.last_task_id is not None and await self.engine.is_unfinished(s.last_task_id)

    async def _save(self, before: ScheduleRecord, after: ScheduleRecord, outcome: str) -> str:
        after = replace(after, updated_at=self._stamp(before))
        if not await self.store.update_schedule_if(after, before.updated_at):
            return "raced"
        return outcome

    def _stamp(self, before: ScheduleRecord) -> datetime:
        """A new version stamp, later than the one it replaces even if the clock stands still."""
        now = utcnow()
        return now if now > before.updated_at else before.updated_at + timedelta(microseconds=1)

    async def _fire(self, s: ScheduleRecord, due: datetime, now: datetime, after: ScheduleRecord) -> str:
        runs = s.runs + 1
        finished = after.next_run_at is None or (s.max_runs is not None and runs >= s.max_runs)
        after = replace(
            after,
            runs=runs,
            last_run_at=now,
            next_run_at=None if finished else after.next_run_at,
            finished_at=now if finished and after.queued_run_at is None else None,
            updated_at=self._stamp(s),
            last_error=None,
        )
        try:
            task_id = await self.engine.fire_scheduled(s, due, after, expected=s.updated_at)
        except EngineError as exc:  # the agent was deleted, its file broke, the queue is full: move on
            log.warning("schedule %s could not start its %s run: %s", s.id, due.isoformat(), exc)
            failed = replace(after, runs=s.runs, last_run_at=s.last_run_at, last_error=str(exc))
            message = f"schedule {s.name!r} ({s.id}) could not start its {due.isoformat()} run: {exc}"
            self._notify(s, NotificationKind.schedule_skipped, message)
            return await self._save(s, failed, "failed")
        if task_id is None:
            return "raced"  # another scheduler decided this due time; we read again
        self._notify(
            s,
            NotificationKind.schedule_fired,
            f"schedule {s.name!r} ({s.id}) started task {task_id} for its {due.isoformat()} run",
            task_id=task_id,
        )
        return "fired"

    def _notify(
        self, s: ScheduleRecord, kind: NotificationKind, message: str, task_id: str | None = None
    ) -> None:
        self.engine.notify_schedule(kind, s, message, task_id)

    # ---- the API -------------------------------------------------------------

    def _cron(self, expr: str, timezone: str) -> Cron:
        return Cron(expr, timezone, self.config)

    def _stored_cron(self, s: ScheduleRecord) -> Cron:
        """A stored expression was validated when written; a later, stricter config must not break it.

        Cached: parsing and the zone lookup cost more than the fire itself at thousands of schedules.
        """
        key = (s.cron, s.timezone)
        cron = self._crons.get(key)
        if cron is None:
            if len(self._crons) > 10_000:
                self._crons.clear()
            cron = Cron(s.cron, s.timezone, _STORED, check_interval=False)
            self._crons[key] = cron
        return cron

    def _check_options(self, options: TaskOptions | None) -> TaskOptions:
        options = options or TaskOptions()
        given = [k for k in _FORBIDDEN_OPTIONS if getattr(options, k) is not None]
        if given:
            raise InvalidRequest(
                f"options {', '.join(given)} cannot be used in a schedule: each run starts its own "
                "workflow when it is due"
            )
        return options

    async def create(self, spec: ScheduleSpec, scope: str | None, project: str | None) -> ScheduleCreated:
        cron = self._cron(spec.cron, spec.timezone)
        options = self._check_options(spec.options)
        scope, project = self.engine.admit_scope(options.scope or scope, project)
        self.engine.check_task(
            spec.agent_definition, spec.prompt, options.model_copy(update={"scope": scope}), project
        )
        if spec.start_at and spec.end_at and spec.end_at <= spec.start_at:
            raise InvalidRequest("end_at must be after start_at")
        if await self.store.count_schedules() >= self.config.max_schedules:
            raise InvalidRequest(
                f"there are already {self.config.max_schedules} schedules (schedules.max_schedules); "
                "delete some first"
            )
        now = self.clock.now()
        record = ScheduleRecord(
            id=_new_id(),
            name=spec.name or spec.agent_definition,
            agent=spec.agent_definition,
            prompt=spec.prompt,
            cron=cron.expr,
            timezone=spec.timezone,
            options=options.model_dump(mode="json", exclude_defaults=True, exclude={"scope"}),
            scope=scope,
            project=project,
            enabled=True,
            overlap=spec.overlap,
            misfire=spec.misfire,
            created_at=now,
            updated_at=utcnow(),
            start_at=spec.start_at,
            end_at=spec.end_at,
            max_runs=spec.max_runs,
        )
        try:
            record.next_run_at = self._upcoming(cron, record, now)
            next_runs = self._next_runs(cron, record, now)
        except (OverflowError, CroniterError) as exc:  # a bound near the calendar's edge
            raise InvalidRequest(f"no fire time can be computed for this schedule: {exc}") from exc
        if record.next_run_at is None:
            raise InvalidRequest("this schedule would never run: no fire time before end_at")
        await self.store.save_schedule(record)
        self.wake()
        return ScheduleCreated(schedule_id=record.id, next_runs=next_runs)

    def _next_runs(self, cron: Cron, s: ScheduleRecord, now: datetime) -> list[datetime]:
        if not s.enabled or s.finished_at is not None or s.next_run_at is None:
            return []
        runs = [s.next_run_at]
        left = None if s.max_runs is None else s.max_runs - s.runs
        while len(runs) < NEXT_RUNS_SHOWN and (left is None or len(runs) < left):
            upcoming = self._upcoming(cron, s, runs[-1])
            if upcoming is None:
                break
            runs.append(upcoming)
        return runs if left is None else runs[: max(left, 0)]

    async def _get(self, schedule_id: str) -> ScheduleRecord:
        record = await self.store.get_schedule(schedule_id)
        if record is None:
            raise NotFound(f"unknown schedule_id {schedule_id!r}")
        return record

    async def info(self, record: ScheduleRecord, statuses: dict[str, str] | None = None) -> ScheduleInfo:
        """`statuses`: the last runs' task statuses, read for a whole page at once by `list`."""
        if statuses is None:
            statuses = await self.engine.task_statuses([record.last_task_id] if record.last_task_id else [])
        found = statuses.get(record.last_task_id) if record.last_task_id else None
        last_status = TaskStatus(found) if found else None
        state = "finished" if record.finished_at else "active" if record.enabled else "paused"
        cron = self._stored_cron(record)
        return ScheduleInfo(
            schedule_id=record.id,
            name=record.name,
            agent=record.agent,
            prompt=record.prompt,
            cron=record.cron,
            timezone=record.timezone,
            scope=record.scope,
            state=state,  # type: ignore[arg-type]
            overlap=record.overlap,  # type: ignore[arg-type]
            misfire=record.misfire,  # type: ignore[arg-type]
            options=record.options,
            start_at=record.start_at,
            end_at=record.end_at,
            max_runs=record.max_runs,
            runs=record.runs,
            next_run_at=record.next_run_at if state == "active" else None,
            next_runs=self._next_runs(cron, record, self.clock.now()),
            last_run_at=record.last_run_at,
            last_task_id=record.last_task_id,
            last_status=last_status,
            queued_run_at=record.queued_run_at,
            last_error=record.last_error,
            created_at=record.created_at,
            updated_at=record.updated_at,
        )

    async def get(self, schedule_id: str) -> ScheduleInfo:
        return await self.info(await self._get(schedule_id))

    async def list(self, scope: str | None, limit: int, offset: int) -> SchedulePage:
        records, total = await self.store.list_schedules(scope, limit, offset)
        statuses = await self.engine.task_statuses([r.last_task_id for r in records if r.last_task_id])
        end = offset + len(records)
        return SchedulePage(
            schedules=[await self.info(r, statuses) for r in records],
            total=total,
            next_offset=end if end < total else None,
        )

    async def update(
        self, schedule_id: str, change: ScheduleUpdate, project: str | None = None
    ) -> ScheduleInfo:
        """Anyone holding the id may pause, resume or retime a schedule (ids are capabilities), but
        what it runs (prompt, options) runs with its creator's trust, so only a caller from that
        same project may change it."""
        for _ in range(5):  # the scheduler may write the row between our read and our write
            before = await self._get(schedule_id)
            given = change.model_fields_set & {"prompt", "options"}
            if given and before.project is not None and before.project != project:
                raise InvalidRequest(
                    f"schedule {schedule_id} belongs to project {before.project!r}; only a session in that "
                    f"project may change its {' and '.join(sorted(given))} (pause, resume and timing are "
                    "open to anyone holding its id)"
                )
            try:
                after = self._changed(before, change)
                self._next_runs(self._stored_cron(after), after, self.clock.now())  # fails before the write
            except (OverflowError, CroniterError) as exc:
                raise InvalidRequest(f"no fire time can be computed for this schedule: {exc}") from exc
            if await self.store.update_schedule_if(after, before.updated_at):
                self.wake()
                return await self.info(after)
        raise InvalidRequest(f"schedule {schedule_id} kept changing while it was being updated; try again")

    def _changed(self, s: ScheduleRecord, change: ScheduleUpdate) -> ScheduleRecord:
        given = change.model_dump(exclude_unset=True)
        cron = self._cron(given.get("cron", s.cron), given.get("timezone", s.timezone))
        plain = ("prompt", "name", "overlap", "misfire", "start_at", "end_at", "max_runs")
        updates: dict[str, object] = {k: v for k, v in given.items() if k in plain}
        if "cron" in given or "timezone" in given:
            updates["cron"], updates["timezone"] = cron.expr, cron.timezone
        if "options" in given:
            options = self._check_options(change.options)
            scoped = options.model_copy(update={"scope": s.scope})
            self.engine.check_task(s.agent, given.get("prompt", s.prompt), scoped, s.project)
            updates["options"] = options.model_dump(mode="json", exclude_defaults=True, exclude={"scope"})
        elif "prompt" in given:
            self.engine.check_task(s.agent, given["prompt"], TaskOptions(scope=s.scope), s.project)
        after = replace(s, **updates)  # type: ignore[arg-type]
        if after.start_at and after.end_at and after.end_at <= after.start_at:
            raise InvalidRequest("end_at must be after start_at")
        more_room = "max_runs" in given or "end_at" in given or given.get("paused") is False
        if s.finished_at is not None and more_room:
            after = replace(after, finished_at=None)  # given more room, a finished schedule runs again
        if change.paused is not None:
            after = replace(after, enabled=not change.paused)
        now = self.clock.now()
        if not after.enabled:
            after = replace(after, next_run_at=None, queued_run_at=None)
        elif after.finished_at is None:
            timing = {"cron", "timezone", "start_at", "end_at", "max_runs"} & set(given)
            if timing or not s.enabled or s.finished_at is not None or after.next_run_at is None:
                upcoming = self._upcoming(cron, after, now)
                if after.max_runs is not None and after.runs >= after.max_runs:
                    upcoming = None
                after = replace(after, next_run_at=upcoming, finished_at=None if upcoming else now)
        return replace(after, updated_at=self._stamp(s))

    async def delete(self, schedule_id: str) -> ScheduleDeleted:
        if not await self.store.delete_schedule(schedule_id):
            raise NotFound(f"unknown schedule_id {schedule_id!r}")
        self.wake()
        return ScheduleDeleted(schedule_id=schedule_id)

    async def runs(self, schedule_id: str, limit: int, offset: int) -> ScheduleRuns:
        await self._get(schedule_id)
        tasks, total = await self.store.schedule_tasks(schedule_id, limit, offset)
        end = offset + len(tasks)
        return ScheduleRuns(
            schedule_id=schedule_id,
            tasks=[self.engine.task_info(t) for t in tasks],
            total=total,
            next_offset=end if end < total else None,
        )
