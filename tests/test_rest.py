"""The REST API against a real engine and a real uvicorn server: routes, errors, events, and a schema fuzz."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import httpx2
import pytest
import schemathesis
import uvicorn
from anyio.from_thread import BlockingPortal, start_blocking_portal
from conftest import wait_for
from fastapi import FastAPI
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, from_schema
from schemathesis.engine import events as engine_events
from starlette.applications import Starlette

import sidequest
from sidequest.config import ScheduleConfig, Settings
from sidequest.engine.engine import Engine
from sidequest.models import DaemonStatus, utcnow
from sidequest.server.rest import (
    _SSE_BUFFER,
    PREFIX,
    PROJECT_HEADER,
    _EventStream,
    _OpenStreams,
    build_rest_app,
    close_event_streams,
    rest_mount,
)
from sidequest.storage.base import Committed

pytestmark = pytest.mark.both_stores

REPO = Path(sidequest.__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serving_app(engine: Engine, port: int) -> tuple[Starlette, FastAPI]:
    """The REST app mounted as the daemon mounts it, with a status callable built from the engine."""
    started = utcnow()

    async def status() -> DaemonStatus:
        return DaemonStatus(
            version=sidequest.__version__,
            pid=os.getpid(),
            host="127.0.0.1",
            port=port,
            started_at=started,
            uptime_seconds=(utcnow() - started).total_seconds(),
            data_dir=str(engine.settings.home),
            database=str(engine.settings.database_path),
            tasks=await engine.task_counts(),
            running=engine.running_count,
        )

    rest = build_rest_app(engine, status)
    return Starlette(routes=[rest_mount(rest)]), rest


@pytest.fixture
def schedule_config() -> ScheduleConfig:
    """The [schedules] config of `live`; a test parametrizes it to allow second-level crons."""
    return ScheduleConfig()


@pytest.fixture
def settings(settings: Settings, schedule_config: ScheduleConfig) -> Settings:
    return settings.model_copy(update={"schedules": schedule_config})


@dataclass
class Live:
    base: str
    engine: Engine
    rest: FastAPI
    portal: BlockingPortal


@pytest.fixture
def live(settings: Settings) -> Iterator[Live]:
    """Engine and uvicorn on their own loop in a thread, so sync clients (schemathesis) can call them."""
    engine = Engine(settings)
    port = free_port()
    with (
        start_blocking_portal(backend="asyncio") as portal,
        portal.wrap_async_context_manager(engine.running()),
    ):
        app, rest = serving_app(engine, port)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            lifespan="off",
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        serving = portal.start_task_soon(server.serve)
        deadline = time.monotonic() + 10
        while not server.started:
            assert not serving.done(), serving.exception()
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        try:
            yield Live(f"http://127.0.0.1:{port}{PREFIX}", engine, rest, portal)
        finally:
            portal.call(close_event_streams, rest)  # as the daemon does when it starts to stop
            server.should_exit = True
            serving.result(timeout=10)


@pytest.fixture
async def http(live: Live) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=live.base, timeout=10) as client:
        yield client


async def submit(http: httpx2.AsyncClient, agent: str, prompt: str, **options: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"agent_definition": agent, "prompt": prompt}
    if options:
        body["options"] = options
    response = await http.post("/tasks", json=body)
    assert response.status_code in (200, 201), response.text
    return response.json()


async def finished(http: httpx2.AsyncClient, task_id: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        info = (await http.get(f"/tasks/{task_id}")).json()
        return info if info["status"] in ("completed", "failed", "cancelled") else None

    return await wait_for(check, what=f"task {task_id} to finish")


def assert_error(response: httpx2.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"code", "message"}, body
    assert body["code"] == code, body
    return body["message"]


# ---- tasks -----------------------------------------------------------------------


async def test_create_get_and_page_result(http: httpx2.AsyncClient) -> None:
    response = await http.post("/tasks", json={"agent_definition": "big_result", "prompt": "45"})
    assert response.status_code == 201, response.text
    submitted = response.json()
    assert submitted["status"] == "queued" and not submitted["deduplicated"]

    info = await finished(http, submitted["task_id"])
    assert info["status"] == "completed"
    assert info["workflow_id"] == submitted["workflow_id"]
    assert info["result_chars"] == 45
    assert [a["status"] for a in info["attempt_history"]] == ["completed"]

    pages, offset = [], 0
    while offset is not None:
        page = (
            await http.get(
                f"/tasks/{submitted['task_id']}/result", params={"offset": offset, "max_chars": 20}
            )
        ).json()
        assert page["total_chars"] == 45 and page["content_type"] == "text"
        pages.append(page["content"])
        offset = page["next_offset"]
    assert [len(p) for p in pages] == [20, 20, 5]
    assert "".join(pages) == ("abcdefghijklmnopqrstuvwxyz" * 2)[:45]


async def test_get_task_has_the_whole_prompt(http: httpx2.AsyncClient) -> None:
    prompt = "line one\n" + "x" * 5000
    task = await finished(http, (await submit(http, "echo", prompt))["task_id"])
    assert task["prompt"] == prompt
    assert task["prompt_preview"].startswith("line one xxx") and task["prompt_preview"].endswith("…")


async def test_idempotency_key_answers_200_with_the_same_task(http: httpx2.AsyncClient) -> None:
    body = {"agent_definition": "sleep", "prompt": "30", "options": {"idempotency_key": "build-1"}}
    first = await http.post("/tasks", json=body)
    again = await http.post("/tasks", json=body)
    assert first.status_code == 201 and again.status_code == 200, (first.text, again.text)
    assert again.json()["deduplicated"] is True
    assert again.json()["task_id"] == first.json()["task_id"]
    await http.post(f"/tasks/{first.json()['task_id']}/cancel")


async def test_cancel_task_and_workflow(http: httpx2.AsyncClient) -> None:
    first = await submit(http, "sleep", "30", workflow_name="pair")
    second = await submit(http, "sleep", "30", workflow_id=first["workflow_id"])

    cancelled = (await http.post(f"/tasks/{first['task_id']}/cancel")).json()
    assert cancelled == {"cancelled": [first["task_id"]], "already_finished": []}
    again = (await http.post(f"/tasks/{first['task_id']}/cancel")).json()
    assert again == {"cancelled": [], "already_finished": [first["task_id"]]}

    rest = (await http.post(f"/workflows/{first['workflow_id']}/cancel")).json()
    assert rest == {"cancelled": [second["task_id"]], "already_finished": [first["task_id"]]}
    workflow = (await http.get(f"/workflows/{first['workflow_id']}")).json()
    assert workflow["name"] == "pair" and workflow["status"] == "cancelled"
    assert {t["status"] for t in workflow["tasks"]} == {"cancelled"}


async def test_wait_returns_on_finish_or_timeout(http: httpx2.AsyncClient) -> None:
    quick = await submit(http, "sleep", "0.3")
    slow = await submit(http, "sleep", "30")
    try:
        waited = await http.post("/wait", json={"task_ids": [quick["task_id"]], "timeout": 8})
        assert waited.status_code == 200, waited.text
        assert waited.json()["timed_out"] is False
        assert waited.json()["tasks"] == [
            {"task_id": quick["task_id"], "status": "completed", "finished": True}
        ]
        timed = (await http.post("/wait", json={"task_ids": [slow["task_id"]], "timeout": 0.2})).json()
        assert timed["timed_out"] is True and timed["tasks"][0]["finished"] is False
    finally:
        await http.post(f"/tasks/{slow['task_id']}/cancel")
    unknown = await http.post("/wait", json={"task_ids": ["t_missing"]})
    assert "t_missing" in assert_error(unknown, 404, "not_found")
    too_long = await http.post("/wait", json={"task_ids": [quick["task_id"]], "timeout": 60})
    assert "timeout" in assert_error(too_long, 422, "invalid_request")


async def test_result_of_an_unfinished_task_is_409_not_finished(http: httpx2.AsyncClient) -> None:
    slow = await submit(http, "sleep", "30")
    try:
        early = await http.get(f"/tasks/{slow['task_id']}/result")
        message = assert_error(early, 409, "not_finished")
        assert slow["task_id"] in message and "has no result until it finishes" in message
    finally:
        await http.post(f"/tasks/{slow['task_id']}/cancel")


async def test_retry_route_requeues_a_failed_task(http: httpx2.AsyncClient) -> None:
    task = await submit(http, "flaky", "succeed on 2", max_retries=0)
    assert (await finished(http, task["task_id"]))["status"] == "failed"
    retried = await http.post(f"/tasks/{task['task_id']}/retry")
    assert retried.status_code == 200, retried.text
    assert retried.json()["status"] in ("queued", "running")
    done = await finished(http, task["task_id"])
    assert done["status"] == "completed" and done["attempts"] == 2
    again = await http.post(f"/tasks/{task['task_id']}/retry")
    assert "completed" in assert_error(again, 400, "invalid_request")


async def test_status_of_task_and_workflow(http: httpx2.AsyncClient) -> None:
    task = await submit(http, "echo", "hi")
    await finished(http, task["task_id"])
    by_task = (await http.get("/status", params={"task_id": task["task_id"]})).json()
    assert by_task["kind"] == "task" and by_task["task"]["result_preview"] == "hi"
    by_workflow = (await http.get("/status", params={"workflow_id": task["workflow_id"]})).json()
    assert by_workflow["kind"] == "workflow"
    assert [t["task_id"] for t in by_workflow["workflow"]["tasks"]] == [task["task_id"]]

    both = await http.get("/status", params={"task_id": task["task_id"], "workflow_id": task["workflow_id"]})
    assert "exactly one" in assert_error(both, 400, "invalid_request")
    assert_error(await http.get("/status"), 400, "invalid_request")


# ---- lists and scope --------------------------------------------------------------


async def test_active_workflows_history_and_project_scope(
    http: httpx2.AsyncClient, live: Live, tmp_path: Path
) -> None:
    alpha, beta = tmp_path / "alpha", tmp_path / "beta"
    alpha.mkdir()
    beta.mkdir()
    in_alpha = {PROJECT_HEADER: str(alpha)}
    in_beta = {PROJECT_HEADER: str(beta)}

    slow = (
        await http.post(
            "/tasks",
            json={"agent_definition": "sleep", "prompt": "30", "options": {"workflow_name": "slow"}},
            headers=in_alpha,
        )
    ).json()
    quick = (
        await http.post("/tasks", json={"agent_definition": "echo", "prompt": "x"}, headers=in_beta)
    ).json()
    failing = (
        await http.post(
            "/tasks", json={"agent_definition": "fail_permanently", "prompt": "no"}, headers=in_beta
        )
    ).json()
    assert (await http.get(f"/tasks/{slow['task_id']}")).json()["scope"] == str(alpha)
    stored = await live.engine.store.get_task(slow["task_id"])
    assert stored is not None and stored.project == str(alpha), "a client's project is trusted for its task"
    await finished(http, quick["task_id"])
    await finished(http, failing["task_id"])

    active = (await http.get("/workflows", headers=in_alpha)).json()
    assert [w["workflow_id"] for w in active["workflows"]] == [slow["workflow_id"]]
    assert active["workflows"][0]["counts"] == {"running": 1} or active["workflows"][0]["counts"] == {
        "queued": 1
    }
    assert (await http.get("/workflows", headers=in_beta)).json()["total"] == 0
    assert (await http.get("/workflows")).json()["total"] == 0  # the server's own project
    everywhere = (await http.get("/workflows", params={"all_scopes": True})).json()
    assert [w["workflow_id"] for w in everywhere["workflows"]] == [slow["workflow_id"]]

    history = (await http.get("/history", headers=in_beta)).json()
    assert {w["workflow_id"] for w in history["workflows"]} == {quick["workflow_id"], failing["workflow_id"]}
    only_failed = (await http.get("/history", params={"status": "failed"}, headers=in_beta)).json()
    assert [w["workflow_id"] for w in only_failed["workflows"]] == [failing["workflow_id"]]
    both = (
        await http.get("/history", params=[("status", "failed"), ("status", "completed")], headers=in_beta)
    ).json()
    assert both["total"] == 2
    by_agent = (await http.get("/history", params={"agent": "echo", "all_scopes": "true"})).json()
    assert [w["workflow_id"] for w in by_agent["workflows"]] == [quick["workflow_id"]]
    future = (await http.get("/history", params={"since": "2999-01-01T00:00:00"}, headers=in_beta)).json()
    assert future["total"] == 0
    window = {"since": "2000-01-01T00:00:00+05:00", "until": "2999-01-01", "limit": 1}
    paged = (await http.get("/history", params=window, headers=in_beta)).json()
    assert paged["total"] == 2 and len(paged["workflows"]) == 1 and paged["next_offset"] == 1
    running = await http.get("/history", params={"status": "running"})
    assert "list_active_workflows" in assert_error(running, 400, "invalid_request")

    await http.post(f"/workflows/{slow['workflow_id']}/cancel")


async def test_project_header_must_be_absolute(http: httpx2.AsyncClient) -> None:
    message = assert_error(
        await http.get("/workflows", headers={PROJECT_HEADER: "relative/dir"}), 400, "invalid_request"
    )
    assert PROJECT_HEADER in message


async def test_agents_list(http: httpx2.AsyncClient) -> None:
    agents = (await http.get("/agents")).json()
    names = {a["name"] for a in agents["agents"]}
    assert {"echo", "sleep", "fail"} <= names
    assert agents["problems"] == []


async def test_daemon_status(http: httpx2.AsyncClient, live: Live) -> None:
    task = await submit(http, "echo", "count me")
    await finished(http, task["task_id"])
    status = (await http.get("/daemon")).json()
    assert status["pid"] == os.getpid() and status["version"] == sidequest.__version__
    assert status["tasks"] == {"completed": 1} and status["running"] == 0
    assert status["database"] == str(live.engine.settings.database_path)


# ---- notifications ---------------------------------------------------------------------


async def test_notifications_are_read_without_marking_until_acknowledged(http: httpx2.AsyncClient) -> None:
    task = await submit(http, "echo", "note me")
    await finished(http, task["task_id"])

    page = (await http.get("/notifications")).json()
    [note] = page["notifications"]
    assert note["kind"] == "task_completed" and note["task_id"] == task["task_id"]
    assert note["delivered"] is False and page["next_cursor"] == note["cursor"]
    again = (await http.get("/notifications")).json()
    assert again["notifications"] == [note], "a plain GET must not mark anything delivered"
    assert (await http.get("/notifications", params={"since": page["next_cursor"]})).json()[
        "notifications"
    ] == []

    acked = await http.post("/notifications/ack", json={"cursors": [note["cursor"], 999_999]})
    assert acked.status_code == 200 and acked.json() == {"acknowledged": 1}
    assert (await http.get("/notifications")).json()["notifications"] == []
    shown = (await http.get("/notifications", params={"include_delivered": True})).json()
    assert [(n["cursor"], n["delivered"]) for n in shown["notifications"]] == [(note["cursor"], True)]


async def test_notifications_mark_delivered_reads_once(http: httpx2.AsyncClient) -> None:
    task = await submit(http, "echo", "once")
    await finished(http, task["task_id"])
    first = (await http.get("/notifications", params={"mark_delivered": True})).json()
    assert len(first["notifications"]) == 1
    assert (await http.get("/notifications")).json()["notifications"] == []
    by_workflow = await http.get(
        "/notifications", params={"workflow_id": task["workflow_id"], "include_delivered": True}
    )
    assert len(by_workflow.json()["notifications"]) == 1


async def test_notifications_follow_the_project(http: httpx2.AsyncClient, tmp_path: Path) -> None:
    elsewhere = {PROJECT_HEADER: str(tmp_path)}
    task = (
        await http.post("/tasks", json={"agent_definition": "echo", "prompt": "x"}, headers=elsewhere)
    ).json()
    await finished(http, task["task_id"])
    assert (await http.get("/notifications")).json()["notifications"] == []
    assert len((await http.get("/notifications", headers=elsewhere)).json()["notifications"]) == 1
    assert len((await http.get("/notifications", params={"all_scopes": True})).json()["notifications"]) == 1


# ---- schedules ------------------------------------------------------------------------------

EVERY_SECOND = ScheduleConfig(allow_seconds=True, min_interval=1)


def schedule_body(**fields: Any) -> dict[str, Any]:
    return {"agent_definition": "echo", "prompt": "tick", "cron": "0 9 * * 1-5", **fields}


def wall_clock(times: list[str], zone: str) -> set[tuple[int, int]]:
    return {(t.hour, t.minute) for t in (datetime.fromisoformat(r).astimezone(ZoneInfo(zone)) for r in times)}


async def test_schedule_create_list_get_patch_runs_delete(http: httpx2.AsyncClient, tmp_path: Path) -> None:
    created = await http.post(
        "/schedules", json=schedule_body(name="standup", timezone="Europe/Berlin", max_runs=10)
    )
    assert created.status_code == 201, created.text
    sid = created.json()["schedule_id"]
    assert sid.startswith("sch_")
    next_runs = created.json()["next_runs"]
    assert len(next_runs) == 5 and next_runs == sorted(next_runs)
    assert wall_clock(next_runs, "Europe/Berlin") == {(9, 0)}, "09:00 in Berlin, whatever its UTC offset"
    assert all(datetime.fromisoformat(t).isoweekday() <= 5 for t in next_runs)

    listed = (await http.get("/schedules")).json()  # the server's own project is the caller's
    assert [s["schedule_id"] for s in listed["schedules"]] == [sid] and listed["total"] == 1
    elsewhere = {PROJECT_HEADER: str(tmp_path)}
    assert (await http.get("/schedules", headers=elsewhere)).json()["total"] == 0
    assert (await http.get("/schedules", params={"all_scopes": True}, headers=elsewhere)).json()["total"] == 1

    info = (await http.get(f"/schedules/{sid}")).json()
    assert (info["name"], info["agent"], info["state"], info["runs"]) == ("standup", "echo", "active", 0)
    assert (info["overlap"], info["misfire"], info["max_runs"]) == ("skip", "run_once", 10)
    assert info["next_run_at"] == next_runs[0]

    paused = (await http.patch(f"/schedules/{sid}", json={"paused": True})).json()
    assert paused["state"] == "paused" and paused["next_run_at"] is None and paused["next_runs"] == []
    resumed = (await http.patch(f"/schedules/{sid}", json={"paused": False})).json()
    assert resumed["state"] == "active" and resumed["next_run_at"] is not None
    retimed = (await http.patch(f"/schedules/{sid}", json={"cron": "30 6 * * *", "max_runs": None})).json()
    assert retimed["cron"] == "30 6 * * *" and retimed["max_runs"] is None, "null removes the limit"
    assert (retimed["name"], retimed["timezone"], retimed["state"]) == ("standup", "Europe/Berlin", "active")
    assert wall_clock(retimed["next_runs"], "Europe/Berlin") == {(6, 30)}

    runs = (await http.get(f"/schedules/{sid}/runs")).json()
    assert runs == {"schedule_id": sid, "tasks": [], "total": 0, "next_offset": None}

    assert (await http.delete(f"/schedules/{sid}")).json() == {"schedule_id": sid, "deleted": True}
    assert "unknown schedule_id" in assert_error(await http.get(f"/schedules/{sid}"), 404, "not_found")
    assert_error(await http.delete(f"/schedules/{sid}"), 404, "not_found")
    assert_error(await http.patch(f"/schedules/{sid}", json={"paused": True}), 404, "not_found")
    assert_error(await http.get(f"/schedules/{sid}/runs"), 404, "not_found")
    assert (await http.get("/schedules")).json()["total"] == 0


async def test_schedule_scope_is_options_scope_else_the_caller(
    http: httpx2.AsyncClient, tmp_path: Path
) -> None:
    alpha, beta = tmp_path / "alpha", tmp_path / "alpha" / "beta"
    beta.mkdir(parents=True)
    in_alpha = {PROJECT_HEADER: str(alpha)}
    outside = await http.post(
        "/schedules", json=schedule_body(options={"scope": str(tmp_path)}), headers=in_alpha
    )
    assert outside.status_code == 400 and "outside your project" in outside.json()["message"]
    by_header = (await http.post("/schedules", json=schedule_body(), headers=in_alpha)).json()
    by_option = (
        await http.post("/schedules", json=schedule_body(options={"scope": str(beta)}), headers=in_alpha)
    ).json()
    assert (await http.get(f"/schedules/{by_header['schedule_id']}")).json()["scope"] == str(alpha)
    assert (await http.get(f"/schedules/{by_option['schedule_id']}")).json()["scope"] == str(beta)
    listed = (await http.get("/schedules", headers=in_alpha)).json()
    assert [s["schedule_id"] for s in listed["schedules"]] == [by_header["schedule_id"]]


async def test_schedule_errors_say_what_is_wrong(http: httpx2.AsyncClient) -> None:
    words = await http.post("/schedules", json=schedule_body(cron="every day at nine"))
    assert "has 4 fields; expected 5 fields" in assert_error(words, 400, "invalid_request")
    out_of_range = await http.post("/schedules", json=schedule_body(cron="61 * * * *"))
    assert "cron '61 * * * *': minute 61 is out of range 0-59" in assert_error(
        out_of_range, 400, "invalid_request"
    )
    seconds = await http.post("/schedules", json=schedule_body(cron="*/5 * * * * *"))
    message = assert_error(seconds, 400, "invalid_request")
    assert "has 6 fields" in message and "seconds" not in message, "seconds are not allowed by default"
    zone = await http.post("/schedules", json=schedule_body(timezone="Mars/Olympus_Mons"))
    assert "unknown time zone 'Mars/Olympus_Mons'" in assert_error(zone, 400, "invalid_request")
    assert_error(
        await http.post("/schedules", json=schedule_body(agent_definition="nope")), 400, "invalid_request"
    )
    delay = await http.post("/schedules", json=schedule_body(options={"delay": 5}))
    assert "delay" in assert_error(delay, 400, "invalid_request")
    backwards = schedule_body(start_at="2030-01-02T00:00:00Z", end_at="2030-01-01T00:00:00Z")
    message = assert_error(await http.post("/schedules", json=backwards), 400, "invalid_request")
    assert "end_at must be after start_at" in message
    overlap = await http.post("/schedules", json=schedule_body(overlap="sometimes"))
    assert "'body.overlap'" in assert_error(overlap, 422, "invalid_request")
    typo = await http.post("/schedules", json=schedule_body(cronn="* * * * *"))
    assert "unknown key 'body.cronn'" in assert_error(typo, 422, "invalid_request")
    assert_error(await http.get("/schedules", params={"limit": 101}), 422, "invalid_request")
    assert_error(await http.get("/schedules/sch_nope"), 404, "not_found")
    put = await http.put("/schedules/sch_nope", json={})
    assert_error(put, 405, "method_not_allowed")
    assert {"GET", "PATCH", "DELETE"} <= set(put.headers["allow"].split(", ")), "every route on the path"

    sid = (await http.post("/schedules", json=schedule_body())).json()["schedule_id"]
    bad_patch = await http.patch(f"/schedules/{sid}", json={"cron": "* * *"})
    assert "has 3 fields" in assert_error(bad_patch, 400, "invalid_request")
    other_agent = await http.patch(f"/schedules/{sid}", json={"agent_definition": "sleep"})
    assert "unknown key 'body.agent_definition'" in assert_error(other_agent, 422, "invalid_request")
    assert (await http.get(f"/schedules/{sid}")).json()["cron"] == "0 9 * * 1-5", (
        "refused changes change nothing"
    )


@pytest.mark.parametrize("schedule_config", [ScheduleConfig(allow_seconds=True, min_interval=30)])
async def test_schedule_shorter_than_min_interval_is_refused(http: httpx2.AsyncClient) -> None:
    short = await http.post("/schedules", json=schedule_body(cron="*/10 * * * * *"))
    message = assert_error(short, 400, "invalid_request")
    assert "fires every 10s; the shortest interval allowed is 30s (schedules.min_interval" in message
    allowed = await http.post("/schedules", json=schedule_body(cron="*/30 * * * * *"))
    assert allowed.status_code == 201, allowed.text


@pytest.mark.parametrize("schedule_config", [EVERY_SECOND])
async def test_schedule_fires_and_lists_its_runs(http: httpx2.AsyncClient) -> None:
    body = schedule_body(cron="*/1 * * * * *", prompt="tick", max_runs=2)
    created = await http.post("/schedules", json=body)
    assert created.status_code == 201, created.text
    sid = created.json()["schedule_id"]

    async def ran() -> dict[str, Any] | None:
        runs = (await http.get(f"/schedules/{sid}/runs")).json()
        return runs if runs["tasks"] else None

    runs = await wait_for(ran, timeout=10, what="the every-second schedule to fire")
    task = runs["tasks"][0]
    assert task["schedule_id"] == sid and task["agent"] == "echo"
    done = await finished(http, task["task_id"])
    assert done["status"] == "completed" and done["result_preview"] == "tick"
    assert done["schedule_id"] == sid
    info = (await http.get(f"/schedules/{sid}")).json()
    assert info["runs"] >= 1 and info["last_task_id"] is not None
    assert (await http.delete(f"/schedules/{sid}")).status_code == 200


# ---- errors ---------------------------------------------------------------------------------


async def test_errors_are_json(http: httpx2.AsyncClient) -> None:
    assert "unknown task_id" in assert_error(await http.get("/tasks/t_nope"), 404, "not_found")
    assert_error(await http.get("/tasks/t_nope/result"), 404, "not_found")
    assert_error(await http.post("/tasks/t_nope/cancel"), 404, "not_found")
    assert_error(await http.get("/workflows/wf_nope"), 404, "not_found")
    assert_error(await http.post("/workflows/wf_nope/cancel"), 404, "not_found")
    assert "no route" in assert_error(await http.get("/nowhere"), 404, "not_found")
    wrong_method = await http.delete("/tasks")
    assert_error(wrong_method, 405, "method_not_allowed")
    assert "POST" in wrong_method.headers["allow"]

    unknown_agent = await http.post("/tasks", json={"agent_definition": "nope", "prompt": "x"})
    assert_error(unknown_agent, 400, "invalid_request")
    bad_option = await http.post(
        "/tasks", json={"agent_definition": "echo", "prompt": "x", "options": {"priority": "urgent"}}
    )
    message = assert_error(bad_option, 422, "invalid_request")
    assert "'body.options.priority': Input should be 'high', 'normal' or 'low'" in message
    typo = await http.post(
        "/tasks", json={"agent_definition": "echo", "prompt": "x", "options": {"priorty": 1}}
    )
    assert "unknown key 'body.options.priorty'" in assert_error(typo, 422, "invalid_request")
    assert "'query.limit'" in assert_error(
        await http.get("/workflows", params={"limit": 0}), 422, "invalid_request"
    )
    assert_error(await http.get("/workflows", params={"offset": 10**30}), 422, "invalid_request")
    assert_error(await http.get("/history", params={"since": "yesterday"}), 422, "invalid_request")
    assert_error(await http.get("/history", params={"status": "lost"}), 422, "invalid_request")

    broken = await http.post(
        "/tasks", content=b'{"agent_definition": ', headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in assert_error(broken, 422, "invalid_request")
    as_text = await http.post("/tasks", content=b"agent=echo", headers={"content-type": "text/plain"})
    assert "application/json" in assert_error(as_text, 415, "unsupported_media_type")
    untyped = await http.post("/tasks", content=b'{"agent_definition": "echo", "prompt": "x"}')
    assert_error(untyped, 415, "unsupported_media_type")
    assert_error(await http.post("/notifications/ack", json={"cursors": []}), 422, "invalid_request")


async def test_hostile_strings_are_rejected_not_crashes(http: httpx2.AsyncClient, store_kind: str) -> None:
    """NUL bytes, lone surrogates, huge ids and extreme times are the client's mistake: 4xx, never 500."""
    long_id = "t_" + "x" * 10_000
    assert_error(await http.get(f"/tasks/{long_id}"), 404, "not_found")
    assert_error(await http.get("/tasks/a%00b"), 404, "not_found")
    assert_error(await http.get("/status", params={"workflow_id": "wf\x00"}), 404, "not_found")
    assert (await http.get("/history", params={"agent": "a\x00b"})).json()["total"] == 0
    nul_prompt = await http.post("/tasks", json={"agent_definition": "echo", "prompt": "a\x00b"})
    if store_kind == "postgres":  # PostgreSQL text cannot hold NUL: a 400 that says so
        assert "NUL character" in assert_error(nul_prompt, 400, "invalid_request")
    else:
        assert nul_prompt.status_code == 201, nul_prompt.text  # the store keeps NUL; the agent gets it back
        result = await finished(http, nul_prompt.json()["task_id"])
        assert result["result_preview"] == "a\x00b"
    surrogate = '{"agent_definition": "echo", "prompt": "\\ud800"}'
    response = await http.post("/tasks", content=surrogate, headers={"content-type": "application/json"})
    assert "UTF-8" in assert_error(response, 400, "invalid_request")
    odd_key = '{"agent_definition": "echo", "prompt": "x", "options": {"\\udcff": 1}}'
    response = await http.post("/tasks", content=odd_key, headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_request")
    year_one_east = {
        "agent_definition": "echo",
        "prompt": "x",
        "options": {"not_before": "0001-01-01T00:00+05:00"},
    }
    assert "out of range" in assert_error(
        await http.post("/tasks", json=year_one_east), 422, "invalid_request"
    )
    long_name = {PROJECT_HEADER: "/" + "a" * 300}  # one path component longer than the OS allows
    listed = await http.get("/agents", headers=long_name)  # such a folder holds no agent files
    assert listed.status_code == 200 and {a["name"] for a in listed.json()["agents"]} >= {"echo"}
    unknown_agent = {"agent_definition": "nope", "prompt": "x", "options": {"scope": "/" + "a" * 300}}
    assert_error(await http.post("/tasks", json=unknown_agent), 400, "invalid_request")
    too_long = {PROJECT_HEADER: "/" + "a/" * 600}
    assert "header" in assert_error(await http.get("/agents", headers=too_long), 422, "invalid_request")
    for since in (
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "0001-01-01",
        "9999-12-31T23:59:59",
    ):
        response = await http.get("/history", params={"since": since, "until": since})
        assert response.status_code in (200, 422), (since, response.text)


# ---- server-sent events -----------------------------------------------------------------


async def read_events(response: httpx2.Response) -> AsyncIterator[tuple[str, Any]]:
    """(event, data) pairs from an SSE body; comments (pings) are skipped."""
    event, data = "message", []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


async def test_events_stream_names_changed_tasks(http: httpx2.AsyncClient) -> None:
    with anyio.fail_after(15):
        async with http.stream("GET", "/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = read_events(response)
            event, hello = await anext(events)
            assert event == "hello" and hello == {"version": sidequest.__version__, "pid": os.getpid()}

            task = await submit(http, "echo", "push me")
            named, cursor = False, None
            while not (named and cursor):  # the insert, then the completion with its notification
                event, data = await anext(events)
                assert event == "update", (event, data)
                assert set(data) == {"task_ids", "workflow_ids", "notification_cursor"}
                assert data["task_ids"] == sorted(data["task_ids"])
                named = named or task["task_id"] in data["task_ids"]
                cursor = data["notification_cursor"] or cursor
            page = (await http.get("/notifications", params={"since": cursor - 1})).json()
            assert page["notifications"][0]["task_id"] == task["task_id"]


async def test_events_listener_is_removed_when_the_client_leaves(
    http: httpx2.AsyncClient, live: Live
) -> None:
    before = len(live.engine.notifier._listeners)
    with anyio.fail_after(10):
        async with http.stream("GET", "/events") as response:
            await anext(read_events(response))
            assert len(live.engine.notifier._listeners) == before + 1

        async def removed() -> bool:
            return len(live.engine.notifier._listeners) == before

        await wait_for(removed, what="the event listener to be removed after disconnect")


async def test_events_overflow_replaces_the_backlog(engine: Engine) -> None:
    """A client far behind gets one `overflow` (re-read everything), then live updates again."""
    stream = _EventStream(engine, _OpenStreams())
    events = stream._events()
    assert (await anext(events)).event == "hello"
    for i in range(_SSE_BUFFER + 5):
        stream._on_commit(Committed(task_ids={f"t_{i}"}))
    stream._on_commit(Committed())  # nothing changed: no event
    stream._on_commit(Committed(workflow_ids={"wf_b", "wf_a"}))
    overflow = await anext(events)
    assert overflow.event == "overflow"  # replaced commits 0..1000; later ones follow as usual
    later = [json.loads((await anext(events)).data) for _ in range(5)]
    assert [u["task_ids"] for u in later] == [[f"t_{i}"] for i in range(_SSE_BUFFER + 1, _SSE_BUFFER + 5)] + [
        []
    ]
    assert later[-1] == {"task_ids": [], "workflow_ids": ["wf_a", "wf_b"], "notification_cursor": None}
    await events.aclose()


async def test_closing_the_streams_ends_them_cleanly(http: httpx2.AsyncClient, live: Live) -> None:
    """What the daemon calls when it starts to stop: open streams end (not cut off), new ones end at once."""
    with anyio.fail_after(10):
        async with http.stream("GET", "/events") as response:
            events = read_events(response)
            assert (await anext(events))[0] == "hello"
            await anyio.to_thread.run_sync(live.portal.call, close_event_streams, live.rest)
            assert [event async for event in events] == []  # a clean end of the body, no error
        async with http.stream("GET", "/events") as response:
            assert [event for event, _ in [e async for e in read_events(response)]] == ["hello"]


SERVE_SCRIPT = """
import signal, sys, anyio, uvicorn
sys.path.insert(0, {tests!r})
from conftest import all_test_agents
from test_rest import serving_app
from sidequest.config import Settings
from sidequest.engine.engine import Engine
from sidequest.server.http import QuietUvicorn
from sidequest.server.rest import close_event_streams

async def main() -> None:
    engine = Engine(Settings(home={home!r}, agents=all_test_agents(), shutdown_grace=0.5))
    async with engine.running():
        app, rest = serving_app(engine, {port})
        config = uvicorn.Config(app, port={port}, lifespan="off", timeout_graceful_shutdown=30)
        if {style!r} == "uvicorn-signals":  # sse-starlette notices uvicorn's own signal handling
            await uvicorn.Server(config).serve()
            return
        server = QuietUvicorn(config)  # as the daemon: its own signal handling, then close_event_streams

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    close_event_streams(rest)
                    server.stop()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_signal)
            await server.serve()
            tg.cancel_scope.cancel()

anyio.run(main)
"""


@pytest.mark.slow
@pytest.mark.duckdb_only(
    "ending event streams at SIGTERM; the store plays no part, and a process per run is slow"
)
@pytest.mark.parametrize("style", ["daemon", "uvicorn-signals"])
async def test_sigterm_stops_the_server_promptly_with_a_stream_open(tmp_path: Path, style: str) -> None:
    """uvicorn waits for open responses on shutdown; an event stream must end by itself, not hold it up."""
    port = free_port()
    script = SERVE_SCRIPT.format(tests=str(REPO / "tests"), home=str(tmp_path), port=port, style=style)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}{PREFIX}"

        async def up() -> bool:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                async with httpx2.AsyncClient() as client:
                    return (await client.get(f"{base}/daemon")).status_code == 200
            except httpx2.TransportError:
                return False

        await wait_for(up, timeout=20, what="the server to start")
        async with (
            httpx2.AsyncClient(timeout=20) as client,
            client.stream("GET", f"{base}/events") as response,
        ):
            events = read_events(response)
            assert (await anext(events))[0] == "hello"
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(10):
                assert [event async for event in events] == []  # ended cleanly, not cut off
        code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=20))
        elapsed = time.monotonic() - started
        # uvicorn re-raises the signal it caught once it has shut down, so SIGTERM is also a clean exit.
        assert code in (0, -signal.SIGTERM), process.stderr.read() if process.stderr else ""
        assert elapsed < 5, f"shutdown took {elapsed:.1f}s with an event stream open"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---- gc ---------------------------------------------------------------------------------


async def test_gc_dry_run_counts_and_gc_deletes(http: httpx2.AsyncClient) -> None:
    task = await submit(http, "echo", "soon old")
    await finished(http, task["task_id"])
    await anyio.sleep(1.1)

    dry = await http.post("/gc", json={"older_than": "1s", "dry_run": True})
    assert dry.status_code == 200, dry.text
    assert dry.json()["dry_run"] is True and dry.json()["deleted"]["tasks"] == 1
    assert (await http.get(f"/tasks/{task['task_id']}")).status_code == 200

    done = await http.post("/gc", json={"older_than": 1})
    assert done.status_code == 200, done.text
    report = done.json()
    assert report["deleted"] == dry.json()["deleted"] and report["batches"] == 1
    assert report["file_bytes_after"] > 0 and report["checkpointed"] is True
    assert_error(await http.get(f"/tasks/{task['task_id']}"), 404, "not_found")


async def test_gc_without_a_body_uses_the_retention_setting(http: httpx2.AsyncClient) -> None:
    response = await http.post("/gc")
    assert response.status_code == 200, response.text
    assert response.json()["older_than_seconds"] == 30 * 86400


@pytest.mark.parametrize(
    ("older_than", "message"),
    [
        ("abc", "'abc' is not a duration"),
        ("-1d", "an age must be more than zero"),
        ("0s", "an age must be more than zero"),
        ("4000d", "3650-day maximum"),
    ],
)
async def test_gc_refuses_an_age_that_is_no_age(
    http: httpx2.AsyncClient, older_than: str, message: str
) -> None:
    response = await http.post("/gc", json={"older_than": older_than})
    text = assert_error(response, 422, "invalid_request")
    assert "'body.older_than'" in text and message in text, text


# ---- schema fuzz ------------------------------------------------------------------------------

FUZZ_CONFIG = {
    "generation": {"max-examples": 20, "database": "none"},
    # Schema-valid input the engine refuses (an unknown agent, a 40-day delay, a task id that does
    # not exist) is rightly a 400/404/422: the schema cannot say which agents or tasks exist.
    "checks": {"positive_data_acceptance": {"enabled": False}},
}


def test_api_matches_its_schema(live: Live) -> None:
    """Every phase of a schemathesis run (examples, coverage, fuzzing) against the served OpenAPI document.

    Fails on any 5xx, undocumented status or content type, response not matching its model, or
    schema-invalid input that is accepted. The event stream is left out: it never ends.
    """
    config = SchemathesisConfig.from_dict(FUZZ_CONFIG)
    schema = schemathesis.openapi.from_url(f"{live.base}/openapi.json", config=config).exclude(path="/events")
    assert schema.get_base_url() == live.base, "the document's servers entry must point at the mount"
    failures: list[str] = []
    requests = 0
    for event in from_schema(schema).execute():
        if isinstance(event, engine_events.ScenarioFinished):
            requests += len(event.recorder.interactions)
            if event.status in (Status.FAILURE, Status.ERROR):
                for checks in event.recorder.checks.values():
                    for check in checks:
                        if check.failure_info is not None:
                            failure = check.failure_info.failure
                            failures.append(
                                f"{event.label}: {check.name}: {failure.title}\n{failure.message}\n"
                                f"{check.failure_info.code_sample}"
                            )
        elif isinstance(event, engine_events.NonFatalError):
            failures.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, engine_events.FatalError):
            raise event.exception
    assert not failures, "\n\n".join(failures)
    assert requests > 300, f"only {requests} requests: the run did not exercise the API"


async def test_history_times_are_iso_8601_not_numbers(http: httpx2.AsyncClient) -> None:
    """Schemathesis found `since=4.7e-147` accepted (read as a Unix time): a number is refused."""
    for value in ("4.7e-147", "2026", " 17 "):
        response = await http.get("/history", params={"since": value})
        assert response.status_code == 422 and "ISO 8601" in response.json()["message"], response.text
    assert (await http.get("/history", params={"since": "2026-01-01T00:00:00Z"})).status_code == 200
