"""Cron schedules: validation, calendar cases on a clock moved by hand (DST, a week of downtime,
end_at, max_runs, overlap), restarts, racing schedulers, and a real-time seconds schedule.

A real engine on a real DuckDB file; the only thing replaced is the clock, where a test needs
to be somewhere else in the calendar.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from conftest import all_test_agents, store_database, wait_for
from mcp import Client
from tools import call, call_error

from sidequest.config import ScheduleConfig, Settings
from sidequest.engine.engine import Engine
from sidequest.engine.errors import InvalidRequest, NotFound
from sidequest.engine.scheduler import Scheduler
from sidequest.models import ScheduleSpec, ScheduleUpdate, TaskOptions
from sidequest.server.mcp import build_server
from sidequest.testing.clock import ManualClock

pytestmark = pytest.mark.both_stores

SCOPE = "/projects/schedules"


def make_settings(home: Path, **schedules: object) -> Settings:
    return Settings(
        home=home,
        agents=all_test_agents(),
        lease_seconds=2.0,
        shutdown_grace=1.0,
        max_concurrency=8,
        schedules=ScheduleConfig(**schedules),  # type: ignore[arg-type]
        **store_database(),
    )


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(utc(2026, 3, 6, 12, 0))


@pytest.fixture
async def engine(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Engine]:
    eng = Engine(make_settings(tmp_path), clock=clock)
    async with eng.running():
        yield eng


def spec(cron: str, agent: str = "echo", **fields: object) -> ScheduleSpec:
    return ScheduleSpec(agent_definition=agent, prompt="run", cron=cron, **fields)  # type: ignore[arg-type]


async def fire_through(engine: Engine, clock: ManualClock, schedule_id: str, count: int) -> list[datetime]:
    """Move the clock to each next fire time and let the scheduler act; the instants it fired at."""
    fired = []
    for _ in range(count):
        info = await engine.get_schedule(schedule_id)
        assert info.next_run_at is not None, info
        clock.set(info.next_run_at)
        await engine.scheduler.run_due()
        after = await engine.get_schedule(schedule_id)
        assert after.runs == info.runs + 1, (info, after)
        fired.append(info.next_run_at)
    return fired


async def tasks_of(engine: Engine, schedule_id: str) -> list[str]:
    runs = await engine.schedule_runs(schedule_id, limit=1000)
    assert all(t.schedule_id == schedule_id for t in runs.tasks)
    return [t.task_id for t in runs.tasks]


# ---- validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "fields", "message"),
    [
        ("* * * *", {}, "has 4 fields; expected 5 fields"),
        ("*/5 * * * * *", {}, "has 6 fields"),
        ("61 * * * *", {}, "minute 61 is out of range 0-59"),
        ("0 25 * * *", {}, "hour 25 is out of range 0-23"),
        ("0 9 0 * *", {}, "day-of-month 0 is out of range 1-31"),
        ("0 9 * 1-13 *", {}, "month 13 is out of range 1-12"),
        ("0 9 * * 8", {}, "day-of-week 8 is out of range 0-7"),
        ("*/0 * * * *", {}, "the minute step '0' must be a whole number above 0"),
        ("@fortnightly", {}, "or one of @yearly"),
        ("0 9 * * 1-5", {"timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ("0 9 * * *", {"options": TaskOptions(workflow_id="wf_x")}, "workflow_id cannot be used"),
        ("0 9 * * *", {"start_at": utc(2027, 1, 2), "end_at": utc(2027, 1, 1)}, "end_at must be after"),
        ("0 9 * * *", {"end_at": utc(2026, 3, 6, 12, 30)}, "would never run"),
    ],
)
async def test_bad_schedules_are_refused_with_a_reason_and_write_nothing(
    engine: Engine, cron: str, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        await engine.schedule_task(spec(cron, **fields), SCOPE)
    assert message in str(refused.value)
    assert (await engine.store.count_rows())["scheduled_tasks"] == 0


@pytest.mark.parametrize(
    ("alias", "expanded"),
    [("@daily", "0 0 * * *"), ("@HOURLY", "0 * * * *"), ("@weekly", "0 0 * * 0"), ("@monthly", "0 0 1 * *")],
)
async def test_cron_shorthands_are_accepted_and_stored_expanded(
    engine: Engine, alias: str, expanded: str
) -> None:
    created = await engine.schedule_task(spec(alias), SCOPE)
    info = await engine.get_schedule(created.schedule_id)
    assert info.cron == expanded
    assert created.next_runs and created.next_runs[0] > utc(2026, 3, 6, 12)


async def test_unknown_agent_and_short_interval_are_refused(tmp_path: Path, clock: ManualClock) -> None:
    eng = Engine(make_settings(tmp_path, min_interval=300), clock=clock)
    async with eng.running():
        with pytest.raises(InvalidRequest, match="fires every 60s; the shortest interval allowed is 300s"):
            await eng.schedule_task(spec("* * * * *"), SCOPE)
        with pytest.raises(InvalidRequest, match="no agent named"):
            await eng.schedule_task(spec("0 9 * * *", agent="nobody"), SCOPE)


async def test_next_five_runs_follow_the_time_zone(engine: Engine) -> None:
    created = await engine.schedule_task(spec("0 9 * * 1-5", timezone="Europe/Berlin"), SCOPE)
    # Friday 2026-03-06 12:00 UTC: the next weekday 09:00 in Berlin (CET, UTC+1) is Monday.
    assert created.next_runs == [
        utc(2026, 3, 9, 8),
        utc(2026, 3, 10, 8),
        utc(2026, 3, 11, 8),
        utc(2026, 3, 12, 8),
        utc(2026, 3, 13, 8),
    ]
    info = await engine.get_schedule(created.schedule_id)
    assert info.state == "active" and info.next_run_at == utc(2026, 3, 9, 8) and info.scope == SCOPE


# ---- calendar ------------------------------------------------------------------------


async def test_dst_spring_forward_and_fall_back_fire_once_a_day_at_the_right_instant(
    engine: Engine, clock: ManualClock
) -> None:
    created = await engine.schedule_task(
        spec("30 2 * * *", timezone="America/New_York", overlap="allow"), SCOPE
    )
    spring = await fire_through(engine, clock, created.schedule_id, 3)
    assert spring == [
        utc(2026, 3, 7, 7, 30),  # 02:30 EST
        utc(2026, 3, 8, 7, 0),  # 02:30 does not exist on 8 March: 03:00 EDT, once
        utc(2026, 3, 9, 6, 30),  # 02:30 EDT
    ]
    # Paused before the clock jumps: else the scheduler's own loop may see the months in between
    # as a missed run and fire its catch-up before the pause lands (a flaky 7th task).
    await engine.update_schedule(created.schedule_id, ScheduleUpdate(paused=True))
    clock.set(utc(2026, 10, 30, 12))
    await engine.update_schedule(created.schedule_id, ScheduleUpdate(paused=False))  # no catch-up
    fall = await fire_through(engine, clock, created.schedule_id, 3)
    assert fall == [utc(2026, 10, 31, 6, 30), utc(2026, 11, 1, 7, 30), utc(2026, 11, 2, 7, 30)]
    assert len(await tasks_of(engine, created.schedule_id)) == 6


async def test_a_repeated_hour_fires_once(engine: Engine, clock: ManualClock) -> None:
    clock.set(utc(2026, 10, 31, 12))
    created = await engine.schedule_task(
        spec("30 1 * * *", timezone="America/New_York", overlap="allow"), SCOPE
    )
    # 1 November: 01:30 happens at 05:30Z (EDT) and again at 06:30Z (EST); cron means it once.
    assert created.next_runs[:3] == [
        utc(2026, 11, 1, 5, 30),
        utc(2026, 11, 2, 6, 30),
        utc(2026, 11, 3, 6, 30),
    ]


async def test_a_week_down_gives_one_catch_up_run_or_none(engine: Engine, clock: ManualClock) -> None:
    once = await engine.schedule_task(spec("0 * * * *", misfire="run_once"), SCOPE)
    skip = await engine.schedule_task(spec("0 * * * *", misfire="skip"), SCOPE)
    clock.advance(timedelta(days=7, minutes=10))
    await engine.scheduler.run_due()
    assert len(await tasks_of(engine, once.schedule_id)) == 1  # never a burst of 168
    assert await tasks_of(engine, skip.schedule_id) == []
    for schedule_id in (once.schedule_id, skip.schedule_id):
        info = await engine.get_schedule(schedule_id)
        assert info.next_run_at == utc(2026, 3, 13, 13)  # the next hour after now, not the backlog
    notes = await engine.notifications(scope=SCOPE, limit=100)
    skipped = [n for n in notes.notifications if n.kind == "schedule_skipped"]
    assert len(skipped) == 1 and skip.schedule_id in skipped[0].message
    fired = [n for n in notes.notifications if n.kind == "schedule_fired"]
    assert len(fired) == 1 and once.schedule_id in fired[0].message


async def test_end_at_and_max_runs_finish_a_schedule(engine: Engine, clock: ManualClock) -> None:
    ending = await engine.schedule_task(
        spec("0 12 * * *", end_at=utc(2026, 3, 8, 13), overlap="allow"), SCOPE
    )
    assert ending.next_runs == [utc(2026, 3, 7, 12), utc(2026, 3, 8, 12)]
    await fire_through(engine, clock, ending.schedule_id, 2)
    info = await engine.get_schedule(ending.schedule_id)
    assert info.state == "finished" and info.next_run_at is None and info.runs == 2

    limited = await engine.schedule_task(spec("0 * * * *", max_runs=3, overlap="allow"), SCOPE)
    assert len(limited.next_runs) == 3
    await fire_through(engine, clock, limited.schedule_id, 3)
    info = await engine.get_schedule(limited.schedule_id)
    assert info.state == "finished" and info.runs == 3
    clock.advance(timedelta(days=1))
    await engine.scheduler.run_due()
    assert len(await tasks_of(engine, limited.schedule_id)) == 3


async def test_overlap_skip_queue_allow(engine: Engine, clock: ManualClock) -> None:
    ids = {}
    for overlap in ("skip", "queue", "allow"):
        created = await engine.schedule_task(spec("0 * * * *", agent="sleep", overlap=overlap), SCOPE)
        ids[overlap] = created.schedule_id
    await engine.update_schedule(ids["skip"], ScheduleUpdate(prompt="2"))
    await engine.update_schedule(ids["queue"], ScheduleUpdate(prompt="2"))
    await engine.update_schedule(ids["allow"], ScheduleUpdate(prompt="2"))
    clock.set(utc(2026, 3, 6, 13))
    await engine.scheduler.run_due()  # (moving the clock also wakes the scheduler's own loop)
    assert [len(await tasks_of(engine, ids[o])) for o in ("skip", "queue", "allow")] == [1, 1, 1]
    clock.set(utc(2026, 3, 6, 14))  # the 13:00 runs (2 s of real sleep) are still going
    await engine.scheduler.run_due()  # only allow starts a second run now
    assert len(await tasks_of(engine, ids["skip"])) == 1
    assert len(await tasks_of(engine, ids["queue"])) == 1
    assert len(await tasks_of(engine, ids["allow"])) == 2
    queued = await engine.get_schedule(ids["queue"])
    assert queued.queued_run_at == utc(2026, 3, 6, 14) and queued.next_run_at == utc(2026, 3, 6, 15)

    async def queued_started() -> bool:
        return len(await tasks_of(engine, ids["queue"])) == 2

    await wait_for(queued_started, timeout=15, what="the queued run to start after the first")
    assert (await engine.get_schedule(ids["queue"])).queued_run_at is None
    assert len(await tasks_of(engine, ids["skip"])) == 1


async def test_pause_resume_and_delete(engine: Engine, clock: ManualClock) -> None:
    created = await engine.schedule_task(spec("0 * * * *"), SCOPE)
    paused = await engine.update_schedule(created.schedule_id, ScheduleUpdate(paused=True))
    assert paused.state == "paused" and paused.next_run_at is None and paused.next_runs == []
    clock.advance(timedelta(hours=5))
    await engine.scheduler.run_due()
    assert await tasks_of(engine, created.schedule_id) == []
    resumed = await engine.update_schedule(
        created.schedule_id, ScheduleUpdate(paused=False, cron="30 * * * *")
    )
    assert resumed.state == "active" and resumed.next_run_at == utc(2026, 3, 6, 17, 30)
    page = await engine.list_schedules(scope=SCOPE)
    assert [s.schedule_id for s in page.schedules] == [created.schedule_id]
    assert (await engine.list_schedules(scope="/elsewhere")).total == 0
    assert (await engine.list_schedules(scope="/elsewhere", all_scopes=True)).total == 1
    await engine.delete_schedule(created.schedule_id)
    with pytest.raises(NotFound):
        await engine.get_schedule(created.schedule_id)
    with pytest.raises(NotFound):
        await engine.delete_schedule(created.schedule_id)


# ---- durability and races ---------------------------------------------------------------


async def test_restart_between_due_times_neither_repeats_nor_loses_a_run(tmp_path: Path) -> None:
    clock = ManualClock(utc(2026, 3, 6, 12, 0))
    first = Engine(make_settings(tmp_path), clock=clock)
    async with first.running():
        created = await first.schedule_task(spec("0 * * * *", overlap="allow"), SCOPE)
        await fire_through(first, clock, created.schedule_id, 1)  # 13:00
    clock.set(utc(2026, 3, 6, 13, 30))  # down between 13:00 and 14:00
    second = Engine(make_settings(tmp_path), clock=clock)
    async with second.running():
        await second.scheduler.run_due()
        assert len(await tasks_of(second, created.schedule_id)) == 1  # 13:00 is not fired again
        clock.set(utc(2026, 3, 6, 14, 0, 5))
        await second.scheduler.run_due()
        assert len(await tasks_of(second, created.schedule_id)) == 2
        assert (await second.store.count_rows())["schedule_fires"] == 2


async def test_racing_schedulers_fire_each_due_time_once(engine: Engine, clock: ManualClock) -> None:
    ids = [
        (await engine.schedule_task(spec("0 * * * *", overlap="allow"), SCOPE)).schedule_id for _ in range(15)
    ]
    rivals = [engine.scheduler, Scheduler(engine, clock), Scheduler(engine, clock)]
    clock.set(utc(2026, 3, 6, 13, 0, 1))
    started: list[int] = []

    async def run(scheduler: Scheduler) -> None:
        started.append(await scheduler.run_due())

    async with anyio.create_task_group() as tg:
        for scheduler in rivals:
            tg.start_soon(run, scheduler)
    assert sum(started) <= 15  # (the engine's own loop, woken by the clock, may take some)
    for schedule_id in ids:
        assert len(await tasks_of(engine, schedule_id)) == 1
    assert (await engine.store.count_rows())["schedule_fires"] == 15


# ---- real time ------------------------------------------------------------------------


async def test_seconds_schedule_fires_in_real_time_then_pauses(tmp_path: Path) -> None:
    eng = Engine(make_settings(tmp_path, allow_seconds=True, min_interval=1))
    async with eng.running():
        created = await eng.schedule_task(spec("* * * * * *"), SCOPE)  # every second

        async def three_runs() -> bool:
            return (await eng.get_schedule(created.schedule_id)).runs >= 3

        await wait_for(three_runs, timeout=10, what="three runs of an every-second schedule")
        paused = await eng.update_schedule(created.schedule_id, ScheduleUpdate(paused=True))
        await anyio.sleep(2.5)
        assert (await eng.get_schedule(created.schedule_id)).runs == paused.runs
        runs = await eng.schedule_runs(created.schedule_id)
        assert runs.total == paused.runs
        task = await eng.get_task(runs.tasks[0].task_id)
        assert task.schedule_id == created.schedule_id
        status = await eng.status(task_id=task.task_id)
        assert status.task is not None and status.task.schedule_id == created.schedule_id


# ---- the MCP tools ----------------------------------------------------------------------


async def test_schedule_tools(engine: Engine, clock: ManualClock) -> None:
    async with Client(build_server(engine, SCOPE)) as client:
        created = await call(
            client,
            "schedule_task",
            agent_definition="echo",
            prompt="papers",
            cron="0 9 * * 1-5",
            timezone="Europe/Berlin",
            name="papers",
        )
        assert len(created["next_runs"]) == 5
        listed = await call(client, "list_schedules")
        assert [s["name"] for s in listed["schedules"]] == ["papers"]
        assert listed["schedules"][0]["next_run_at"].startswith("2026-03-09T08:00")
        paused = await call(client, "update_schedule", schedule_id=created["schedule_id"], paused=True)
        assert paused["state"] == "paused"
        error = await call_error(
            client, "schedule_task", agent_definition="echo", prompt="x", cron="61 * * * *"
        )
        assert "minute 61 is out of range 0-59" in error
        error = await call_error(
            client, "schedule_task", agent_definition="echo", prompt="", cron="0 9 * * *"
        )
        assert "prompt" in error and "internal error" not in error
        clock.set(utc(2026, 3, 9, 8))
        await call(client, "update_schedule", schedule_id=created["schedule_id"], paused=False)
        runs = await call(client, "get_schedule_runs", schedule_id=created["schedule_id"])
        assert runs["total"] == 0
        await call(client, "delete_schedule", schedule_id=created["schedule_id"])
        assert "unknown schedule_id" in await call_error(
            client, "delete_schedule", schedule_id=created["schedule_id"]
        )
