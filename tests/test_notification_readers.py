"""Notifications belong to their reader: the terminal (`sidequest notifications`), a project's MCP
sessions and each REST client each get every notification once, whatever the others read.

Through real surfaces: a detached daemon, `sidequest stdio` fronts, CLI subprocesses, REST over
HTTP on 127.0.0.1, and the DuckDB file itself for the migration and retention.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import duckdb
import httpx2
import pytest
from test_daemon import call, front, kill_daemons, sidequest_cli, state_of, wait_task
from test_engine import opts, running_engine, wait_status

from sidequest.models import NotificationPage, TaskStatus
from sidequest.storage.duckdb import Q, migrations

pytestmark = pytest.mark.slow


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    try:
        yield home
    finally:
        kill_daemons(home)


async def cli(home: Path, project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A CLI process off the event loop, so the MCP client's stream keeps being read meanwhile."""
    done = await anyio.to_thread.run_sync(lambda: sidequest_cli(home, *args, project=str(project)))
    assert done.returncode == 0, done.stderr
    return done


async def cli_notes(home: Path, project: Path, *args: str) -> NotificationPage:
    return NotificationPage.model_validate_json(
        (await cli(home, project, "notifications", "--json", *args)).stdout
    )


def task_ids(page: dict[str, Any]) -> list[str]:
    return [n["task_id"] for n in page["notifications"]]


async def finished_task(client: Any, prompt: str) -> str:
    task_id = (await call(client, "task_async", agent_definition="echo", prompt=prompt))["task_id"]
    await wait_task(client, task_id)
    return task_id


# ---- the CLI and an MCP session ------------------------------------------------------------


async def test_the_cli_reading_notifications_leaves_them_for_the_mcp_session(
    home: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    async with front(home, str(project)) as session:
        task_id = await finished_task(session, "read me twice")

        by_cli = await cli_notes(home, project)
        assert [n.task_id for n in by_cli.notifications] == [task_id]
        assert (await cli_notes(home, project)).notifications == [], "the CLI's own read counts for the CLI"

        first = await call(session, "get_workflow_notifications")
        assert task_ids(first) == [task_id], "the terminal's read must not take it from the session"
        assert [n["delivered"] for n in first["notifications"]] == [False]
        again = await call(session, "get_workflow_notifications")
        assert again["notifications"] == [], "a second read by the session does not repeat it"


async def test_a_read_whose_reply_was_lost_is_repeated_with_the_same_since(
    home: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    async with front(home, str(project)) as session:
        one = await finished_task(session, "one")
        two = await finished_task(session, "two")
        first = await call(session, "get_workflow_notifications", since=0)
        repeated = await call(session, "get_workflow_notifications", since=0)
        assert task_ids(first) == task_ids(repeated) == [one, two]
        assert [n["delivered"] for n in repeated["notifications"]] == [True, True]
        assert repeated["next_cursor"] == first["next_cursor"]
        after = await call(session, "get_workflow_notifications", since=first["notifications"][0]["cursor"])
        assert task_ids(after) == [two]
        assert (await call(session, "get_workflow_notifications"))["notifications"] == []


async def test_sessions_of_one_project_share_deliveries_and_other_projects_do_not(
    home: Path, tmp_path: Path
) -> None:
    project, other = tmp_path / "project", tmp_path / "other"
    project.mkdir()
    other.mkdir()
    async with front(home, str(project)) as first, front(home, str(other)) as elsewhere:
        task_id = await finished_task(first, "shared")
        assert task_ids(await call(first, "get_workflow_notifications")) == [task_id]
        async with front(home, str(project)) as second:
            assert (await call(second, "get_workflow_notifications"))["notifications"] == []
        everywhere = await call(elsewhere, "get_workflow_notifications", all_scopes=True)
        assert task_id in task_ids(everywhere), "another project's reader has its own deliveries"


# ---- REST readers ---------------------------------------------------------------------------


async def test_rest_readers_are_independent_and_acknowledgements_are_their_own(
    home: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    async with front(home, str(project)) as session:
        task_id = await finished_task(session, "for every reader")
        state = state_of(home)
        base = {"Authorization": f"Bearer {state.token}", "X-Sidequest-Project": str(project)}

        async with httpx2.AsyncClient(base_url=state.url + "/api/v1", headers=base) as http:

            async def read(reader: str | None, **params: Any) -> dict[str, Any]:
                headers = {"X-Sidequest-Reader": reader} if reader else {}
                response = await http.get("/notifications", params=params, headers=headers)
                assert response.status_code == 200, response.text
                return response.json()

            assert task_ids(await read("board", mark_delivered=True)) == [task_id]
            assert (await read("board"))["notifications"] == []
            assert task_ids(await read("bot")) == [task_id], "board's read is board's alone"
            assert task_ids(await read(None)) == [task_id], "the default reader 'rest' is another"

            cursor = (await read("bot"))["notifications"][0]["cursor"]
            acked = await http.post(
                "/notifications/ack", json={"cursors": [cursor]}, headers={"X-Sidequest-Reader": "bot"}
            )
            assert acked.status_code == 200 and acked.json() == {"acknowledged": 1}
            assert (await read("bot"))["notifications"] == []
            assert task_ids(await read(None)) == [task_id]

            bad = await http.get("/notifications", headers={"X-Sidequest-Reader": "no spaces/slashes"})
            assert bad.status_code == 400 and "reader must be" in bad.json()["message"]
            bad_ack = await http.post(
                "/notifications/ack", json={"cursors": [cursor]}, headers={"X-Sidequest-Reader": "x" * 65}
            )
            assert bad_ack.status_code == 400
            assert task_ids(await read(None)) == [task_id], "a refused request changed nothing"

        assert task_ids(await call(session, "get_workflow_notifications")) == [task_id]
        assert [n.task_id for n in (await cli_notes(home, project, "--peek")).notifications] == [task_id]


# ---- durability -----------------------------------------------------------------------------


async def test_deliveries_survive_a_daemon_restart(home: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    async with front(home, str(project)) as session:
        task_id = await finished_task(session, "before the restart")
        assert task_ids(await call(session, "get_workflow_notifications")) == [task_id]
        state = state_of(home)
        headers = {
            "Authorization": f"Bearer {state.token}",
            "X-Sidequest-Project": str(project),
            "X-Sidequest-Reader": "board",
        }
        async with httpx2.AsyncClient(base_url=state.url + "/api/v1", headers=headers) as http:
            cursor = (await http.get("/notifications")).json()["notifications"][0]["cursor"]
            assert (await http.post("/notifications/ack", json={"cursors": [cursor]})).status_code == 200

    await cli(home, project, "stop")
    async with front(home, str(project)) as session:  # starts a new daemon on the same file
        assert state_of(home).pid != state.pid
        assert (await call(session, "get_workflow_notifications"))["notifications"] == []
        later = await finished_task(session, "after the restart")
        assert [n.task_id for n in (await cli_notes(home, project)).notifications] == [task_id, later]
        new = state_of(home)
        headers = {**headers, "Authorization": f"Bearer {new.token}"}
        async with httpx2.AsyncClient(base_url=new.url + "/api/v1", headers=headers) as http:
            assert [n["task_id"] for n in (await http.get("/notifications")).json()["notifications"]] == [
                later
            ]


# ---- the store ------------------------------------------------------------------------------


async def test_marks_from_before_readers_stay_delivered_for_every_surface_of_their_project(
    tmp_path: Path,
) -> None:
    """A store upgraded from one shared mark: nobody is shown old notifications again, and what
    nobody had is still new to everyone."""
    with duckdb.connect(str(tmp_path / "sidequest.duckdb")) as con:
        con.execute(Q["create_schema_version"])
        for version, sql in migrations():
            if version >= 6:
                break
            con.execute(sql)
            con.execute("INSERT INTO schema_version VALUES (?, now())", [version])
        con.execute(
            "INSERT INTO notifications VALUES "
            "(1, 'task_completed', 't_1', 'wf_1', '/p', 'read before', now(), now()), "
            "(2, 'task_completed', 't_2', 'wf_2', '/p', 'never read', now(), NULL)"
        )
    async with running_engine(tmp_path) as engine:
        for surface in ("mcp", "cli", "rest"):
            page = await engine.notifications(scope="/p", mark_delivered=False, reader=surface)
            assert [n.cursor for n in page.notifications] == [2], surface
        fresh = await engine.notifications(scope="/p", mark_delivered=False, reader="board")
        assert [n.cursor for n in fresh.notifications] == [1, 2], "a new reader starts at the beginning"


async def test_retention_deletes_the_marks_of_the_notifications_it_deletes(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as engine:
        older = await engine.submit("echo", "older", opts(scope="/p"))
        await wait_status(engine, older.task_id, TaskStatus.completed)
        newer = await engine.submit("echo", "newer", opts(scope="/p"))
        await wait_status(engine, newer.task_id, TaskStatus.completed)
        read = await engine.notifications(scope="/p", reader="mcp")
        assert [n.task_id for n in read.notifications] == [older.task_id, newer.task_id]
        await engine.acknowledge([n.cursor for n in read.notifications], scope="/p", reader="cli")
        report = await engine.gc(older_than=0.001, dry_run=False)
        assert report.deleted.notifications == 1, report  # the newest stays: cursors never go back
        kept = read.notifications[-1].cursor
    with duckdb.connect(str(tmp_path / "sidequest.duckdb"), read_only=True) as con:
        marks = con.execute("SELECT reader, cursor FROM notification_deliveries ORDER BY reader").fetchall()
    assert marks == [("cli:/p", kept), ("mcp:/p", kept)]
