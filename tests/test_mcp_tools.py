"""The MCP tools as a client sees them, in both protocol eras (2026-07-28 and legacy 2025-11-25)."""

from __future__ import annotations

import json
import warnings
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from conftest import wait_for
from mcp import Client, MCPError
from mcp.server.mcpserver import MCPServer
from mcp_types import ResourceUpdatedNotification
from tools import call, call_error, submit, wait_status

from sidequest.engine.engine import Engine
from sidequest.server.mcp import INSTRUCTIONS, build_server

pytestmark = pytest.mark.both_stores

SCOPE = "/projects/alpha"
OTHER_SCOPE = "/projects/alpha/beta"  # a narrower scope inside the project: listed apart
MODES = ["auto", "legacy"]
POSTGRES_RUNS_WITH = {"client": "auto", "mode": "auto"}
"""The transport mode does not touch the store: on PostgreSQL each test runs in one mode."""


@pytest.fixture
def server(engine: Engine) -> MCPServer:
    return build_server(engine, SCOPE)


@pytest.fixture(params=MODES)
async def client(request: pytest.FixtureRequest, server: MCPServer) -> AsyncIterator[Client]:
    async with Client(server, mode=request.param) as c:
        yield c


# ---- the everyday path -------------------------------------------------------


async def test_submit_complete_status_result(client: Client) -> None:
    submitted = await submit(client, "echo", "hello from the test")
    assert submitted["status"] == "queued"
    assert submitted["task_id"].startswith("t_")

    task = await wait_status(client, submitted["task_id"], "completed")
    assert task["attempts"] == 1
    assert task["scope"] == SCOPE
    assert task["result_preview"] == "hello from the test"

    workflow = await call(client, "check_workflow_status", workflow_id=submitted["workflow_id"])
    assert workflow["kind"] == "workflow"
    assert workflow["workflow"]["status"] == "completed"
    assert [t["task_id"] for t in workflow["workflow"]["tasks"]] == [submitted["task_id"]]

    page = await call(client, "get_task_result", task_id=submitted["task_id"])
    assert page["content"] == "hello from the test"
    assert page["next_offset"] is None


def _nulls(value: Any, path: str = "") -> list[str]:
    if value is None:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _nulls(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _nulls(v, f"{path}[{i}]")]
    return []


async def test_status_has_no_nulls_elapsed_time_and_a_hint(client: Client) -> None:
    slow = await submit(client, "sleep", "30", workflow_name="slow one")
    await wait_status(client, slow["task_id"], "running")
    try:
        task = await call(client, "check_workflow_status", task_id=slow["task_id"])
        assert _nulls(task) == []
        assert "finished_at" not in task["task"] and "error" not in task["task"]
        assert 0 <= task["elapsed_seconds"] < 30
        assert task["hint"].startswith("running for ") and "(attempt 1" in task["hint"]
        assert task["hint"].endswith("check again in about 30 seconds, or call wait_for_tasks")
        workflow = await call(client, "check_workflow_status", workflow_id=slow["workflow_id"])
        assert _nulls(workflow) == []
        assert workflow["hint"].startswith("running for ") and "0 of 1 tasks finished" in workflow["hint"]
    finally:
        await call(client, "cancel_task", task_id=slow["task_id"])
    done = await submit(client, "echo", "quick")
    await wait_status(client, done["task_id"], "completed")
    report = await call(client, "check_workflow_status", task_id=done["task_id"])
    assert _nulls(report) == []
    assert report["hint"].startswith("completed in ") and "get_task_result" in report["hint"]
    failed = await submit(client, "fail_permanently", "no", workflow_name="doomed")
    await wait_status(client, failed["task_id"], "failed")
    report = await call(client, "check_workflow_status", workflow_id=failed["workflow_id"])
    assert report["hint"].startswith("failed in ") and "retry_task" in report["hint"]


async def test_status_shows_a_prompt_preview_not_the_whole_prompt(client: Client) -> None:
    prompt = "Summarise   the\nchangelog " + "word " * 200
    submitted = await submit(client, "echo", prompt)
    report = await call(client, "check_workflow_status", task_id=submitted["task_id"])
    preview = report["task"]["prompt_preview"]
    assert preview.startswith("Summarise the changelog word") and preview.endswith("…")
    assert len(preview) == 160 and "prompt" not in report["task"]
    workflow = await call(client, "check_workflow_status", workflow_id=submitted["workflow_id"])
    assert workflow["workflow"]["tasks"][0]["prompt_preview"] == preview


async def test_durations_are_declared_as_seconds_or_text(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    options = tools["task_async"].input_schema["properties"]["options"]["properties"]
    # A client that coerces arguments by schema must be able to send "30m" as it is.
    assert options["timeout"]["type"] == ["number", "string"]
    assert options["delay"]["type"] == ["number", "string"]
    submitted = await submit(client, "echo", "x", timeout="30m", delay="0s")
    task = await wait_status(client, submitted["task_id"], "completed")
    assert task["timeout"] == 1800.0


async def test_big_result_is_paged(client: Client) -> None:
    size = 45_000
    submitted = await submit(client, "big_result", str(size))
    await wait_status(client, submitted["task_id"], "completed")

    pages, offset = [], 0
    while offset is not None:
        page = await call(
            client, "get_task_result", task_id=submitted["task_id"], offset=offset, max_chars=20_000
        )
        assert len(page["content"]) <= 20_000
        assert page["total_chars"] == size
        pages.append(page["content"])
        offset = page["next_offset"]
    assert len(pages) == 3
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    assert "".join(pages) == (alphabet * (size // 26 + 1))[:size]


async def test_result_of_an_unfinished_task_says_it_is_not_finished(client: Client) -> None:
    slow = await submit(client, "sleep", "30")
    await wait_status(client, slow["task_id"], "running")
    try:
        message = await call_error(client, "get_task_result", task_id=slow["task_id"])
        assert f"task {slow['task_id']} is running (attempt 1" in message
        assert "has no result until it finishes" in message and "wait_for_tasks" in message
    finally:
        await call(client, "cancel_task", task_id=slow["task_id"])
    cancelled = await call(client, "get_task_result", task_id=slow["task_id"])  # finished: no error
    assert cancelled["status"] == "cancelled" and cancelled["content"] == ""


async def test_result_page_size_is_capped(client: Client) -> None:
    message = await call_error(client, "get_task_result", task_id="t_x", max_chars=50_001)
    assert "max_chars" in message


async def test_notification_returned_once_unless_include_delivered(client: Client) -> None:
    submitted = await submit(client, "echo", "notify me", workflow_name="named run")
    await wait_status(client, submitted["task_id"], "completed")
    wid = submitted["workflow_id"]

    first = await call(client, "get_workflow_notifications", workflow_id=wid)
    kinds = sorted(n["kind"] for n in first["notifications"])
    assert kinds == ["task_completed", "workflow_completed"]
    assert all(not n["delivered"] for n in first["notifications"])
    assert any(submitted["task_id"] in n["message"] for n in first["notifications"])

    again = await call(client, "get_workflow_notifications", workflow_id=wid)
    assert again["notifications"] == []

    shown = await call(client, "get_workflow_notifications", workflow_id=wid, include_delivered=True)
    assert sorted(n["kind"] for n in shown["notifications"]) == kinds
    assert all(n["delivered"] for n in shown["notifications"])


async def test_notifications_cursor_and_peek(client: Client) -> None:
    one = await submit(client, "echo", "one")
    await wait_status(client, one["task_id"], "completed")
    peek = await call(client, "get_workflow_notifications", mark_delivered=False)
    assert [n["task_id"] for n in peek["notifications"]] == [one["task_id"]]
    page = await call(client, "get_workflow_notifications")
    assert [n["cursor"] for n in page["notifications"]] == [n["cursor"] for n in peek["notifications"]]

    two = await submit(client, "echo", "two")
    await wait_status(client, two["task_id"], "completed")
    newer = await call(
        client, "get_workflow_notifications", since=page["next_cursor"], include_delivered=True
    )
    assert {n["workflow_id"] for n in newer["notifications"]} == {two["workflow_id"]}


async def test_cancel_running_task(client: Client) -> None:
    submitted = await submit(client, "sleep", "30")
    await wait_status(client, submitted["task_id"], "running")

    result = await call(client, "cancel_task", task_id=submitted["task_id"])
    assert result["cancelled"] == [submitted["task_id"]]
    task = await wait_status(client, submitted["task_id"], "cancelled", timeout=5)
    assert task["finished_at"] is not None

    again = await call(client, "cancel_task", task_id=submitted["task_id"])
    assert again == {"cancelled": [], "already_finished": [submitted["task_id"]]}


async def test_cancel_needs_exactly_one_id(client: Client) -> None:
    assert "exactly one" in await call_error(client, "cancel_task")
    assert "exactly one" in await call_error(client, "check_workflow_status")
    assert "unknown task_id" in await call_error(client, "cancel_task", task_id="t_nope")


# ---- rejected requests ---------------------------------------------------------


async def test_unknown_agent_lists_known_agents(client: Client) -> None:
    message = await call_error(client, "task_async", agent_definition="nope", prompt="x")
    assert "no agent named 'nope'" in message
    assert "echo" in message and "sleep" in message


async def test_unknown_option_key_is_named(client: Client) -> None:
    message = await call_error(
        client, "task_async", agent_definition="echo", prompt="x", options={"priorty": "high"}
    )
    assert "unknown option 'options.priorty'; accepted: priority, timeout, max_retries" in message
    assert "pydantic" not in message and "http" not in message
    nested = await call_error(
        client, "task_async", agent_definition="echo", prompt="x", options={"retry_backoff": {"maxx": 1}}
    )
    assert "unknown option 'options.retry_backoff.maxx'; accepted: initial, factor, max, jitter" in nested
    schedule = await call_error(
        client, "schedule_task", agent_definition="echo", prompt="x", cron="0 9 * * *", options={"tiemout": 5}
    )
    assert "unknown option 'options.tiemout'; accepted: priority, timeout" in schedule


TOOLS_BUDGET = 12_000
"""Characters of what a model reads of the tools on every request: name, description, input schema."""


async def test_tool_definitions_fit_the_budget(client: Client) -> None:
    tools = (await client.list_tools()).tools
    sizes = {
        t.name: len(
            json.dumps({"name": t.name, "description": t.description, "input_schema": t.input_schema})
        )
        for t in tools
    }
    assert sum(sizes.values()) < TOOLS_BUDGET, sorted(sizes.items(), key=lambda kv: -kv[1])
    options = next(t for t in tools if t.name == "task_async").input_schema["properties"]["options"]
    assert "timeout" in options["properties"] and options["additionalProperties"] is False
    assert all('"title":' not in json.dumps(t.input_schema) for t in tools)  # generated titles are dropped


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [(-5, "zero or positive"), (0, "more than zero"), ("1000d", "30-day maximum"), ("10d", "max_timeout")],
)
async def test_bad_timeout_rejected(client: Client, timeout: Any, expected: str) -> None:
    message = await call_error(
        client, "task_async", agent_definition="echo", prompt="x", options={"timeout": timeout}
    )
    assert expected in message


async def test_prompt_over_size_limit_rejected(client: Client, engine: Engine) -> None:
    limit = engine.settings.max_prompt_bytes
    message = await call_error(client, "task_async", agent_definition="echo", prompt="x" * (limit + 1))
    assert f"over the {limit}-byte limit" in message


async def test_empty_prompt_rejected(client: Client) -> None:
    assert "prompt is empty" in await call_error(client, "task_async", agent_definition="echo", prompt="  ")


# ---- waiting and retrying -------------------------------------------------------


async def test_wait_for_any_returns_when_the_first_task_finishes(client: Client) -> None:
    quick = await submit(client, "sleep", "0.3")
    slow = await submit(client, "sleep", "30")
    try:
        result = await call(
            client, "wait_for_tasks", task_ids=[quick["task_id"], slow["task_id"]], timeout=20
        )
        assert result["timed_out"] is False
        assert result["waited_seconds"] < 10
        statuses = {t["task_id"]: (t["status"], t["finished"]) for t in result["tasks"]}
        assert statuses[quick["task_id"]] == ("completed", True)
        assert statuses[slow["task_id"]][1] is False
    finally:
        await call(client, "cancel_task", task_id=slow["task_id"])


async def test_wait_for_all_of_a_workflow(client: Client) -> None:
    first = await submit(client, "sleep", "0.2", workflow_name="pair")
    second = await submit(client, "sleep", "0.4", workflow_id=first["workflow_id"])
    result = await call(client, "wait_for_tasks", workflow_id=first["workflow_id"], mode="all", timeout=20)
    assert result["timed_out"] is False
    assert {t["task_id"]: t["status"] for t in result["tasks"]} == {
        first["task_id"]: "completed",
        second["task_id"]: "completed",
    }


async def test_wait_times_out_with_the_current_status(client: Client) -> None:
    slow = await submit(client, "sleep", "30")
    try:
        result = await call(client, "wait_for_tasks", task_ids=[slow["task_id"]], timeout=0.3)
        assert result["timed_out"] is True
        assert 0.3 <= result["waited_seconds"] < 5
        assert result["tasks"][0]["status"] in ("queued", "running")
    finally:
        await call(client, "cancel_task", task_id=slow["task_id"])


async def test_wait_refuses_unknown_ids_and_long_timeouts(client: Client) -> None:
    assert "t_nope" in await call_error(client, "wait_for_tasks", task_ids=["t_nope"])
    assert "timeout" in await call_error(client, "wait_for_tasks", task_ids=["t_nope"], timeout=51)
    assert "task_ids" in await call_error(client, "wait_for_tasks")


async def test_retry_failed_task_runs_again_with_history_kept(client: Client) -> None:
    failed = await submit(client, "flaky", "succeed on 2", max_retries=0, workflow_name="flaky run")
    await wait_status(client, failed["task_id"], "failed")
    await call(client, "get_workflow_notifications")  # read what the failure said

    again = await call(client, "retry_task", task_id=failed["task_id"])
    assert again["task_id"] == failed["task_id"] and again["status"] in ("queued", "running")
    done = await wait_status(client, failed["task_id"], "completed")
    assert done["attempts"] == 2
    assert [a["status"] for a in done["attempt_history"]] == ["failed", "completed"]
    page = await call(client, "get_task_result", task_id=failed["task_id"])
    assert page["content"] == "succeeded on attempt 2"

    workflow = await call(client, "check_workflow_status", workflow_id=failed["workflow_id"])
    assert workflow["workflow"]["status"] == "completed"  # reopened, then finished again
    kinds = [n["kind"] for n in (await call(client, "get_workflow_notifications"))["notifications"]]
    assert kinds == ["task_retried", "task_completed", "workflow_completed"]


async def test_retry_cancelled_task_reopens_its_workflow(client: Client) -> None:
    task = await submit(client, "sleep", "30")
    await call(client, "cancel_task", task_id=task["task_id"])
    await wait_status(client, task["task_id"], "cancelled")

    async def retried() -> bool:  # the cancelled attempt may still be stopping ("retry in a moment")
        result = await client.call_tool("retry_task", {"task_id": task["task_id"]})
        if result.is_error and "still stopping" in result.content[0].text:  # type: ignore[union-attr]
            return False
        assert not result.is_error, result.content[0].text  # type: ignore[union-attr]
        return True

    await wait_for(retried, what="the cancelled attempt to stop so the task can be retried")
    try:
        await wait_status(client, task["task_id"], "running")
        active = await call(client, "list_active_workflows")
        assert [w["workflow_id"] for w in active["workflows"]] == [task["workflow_id"]]
    finally:
        await call(client, "cancel_task", task_id=task["task_id"])


async def test_retry_refuses_tasks_that_did_not_fail(client: Client) -> None:
    done = await submit(client, "echo", "fine")
    await wait_status(client, done["task_id"], "completed")
    assert "completed; only a failed or cancelled task" in await call_error(
        client, "retry_task", task_id=done["task_id"]
    )
    slow = await submit(client, "sleep", "30")
    try:
        message = await call_error(client, "retry_task", task_id=slow["task_id"])
        assert "only a failed or cancelled task" in message
    finally:
        await call(client, "cancel_task", task_id=slow["task_id"])
    assert "unknown task_id" in await call_error(client, "retry_task", task_id="t_nope")


# ---- listing ---------------------------------------------------------------------


async def test_list_active_workflows_scope_filtering(client: Client) -> None:
    mine = await submit(client, "sleep", "30")
    theirs = await submit(client, "sleep", "30", scope=OTHER_SCOPE)
    try:
        own = await call(client, "list_active_workflows")
        assert [w["workflow_id"] for w in own["workflows"]] == [mine["workflow_id"]]
        assert own["total"] == 1

        every = await call(client, "list_active_workflows", all_scopes=True)
        assert {w["workflow_id"] for w in every["workflows"]} == {mine["workflow_id"], theirs["workflow_id"]}

        first = await call(client, "list_active_workflows", all_scopes=True, limit=1)
        assert len(first["workflows"]) == 1 and first["next_offset"] == 1 and first["total"] == 2
        second = await call(client, "list_active_workflows", all_scopes=True, limit=1, offset=1)
        assert second["next_offset"] is None
        assert {first["workflows"][0]["workflow_id"], second["workflows"][0]["workflow_id"]} == {
            mine["workflow_id"],
            theirs["workflow_id"],
        }
        assert "limit" in await call_error(client, "list_active_workflows", limit=101)
    finally:
        await call(client, "cancel_task", workflow_id=mine["workflow_id"])
        await call(client, "cancel_task", workflow_id=theirs["workflow_id"])
    assert (await call(client, "list_active_workflows", all_scopes=True))["workflows"] == []


async def test_history(client: Client) -> None:
    done = await submit(client, "echo", "fine", workflow_name="good run")
    bad = await submit(client, "fail_permanently", "on purpose")
    await wait_status(client, done["task_id"], "completed")
    await wait_status(client, bad["task_id"], "failed")

    history = await call(client, "get_workflow_history")
    by_id = {w["workflow_id"]: w for w in history["workflows"]}
    assert by_id[done["workflow_id"]]["name"] == "good run"
    assert by_id[done["workflow_id"]]["status"] == "completed"
    assert by_id[bad["workflow_id"]]["status"] == "failed"

    failed = await call(client, "get_workflow_history", status=["failed"])
    assert [w["workflow_id"] for w in failed["workflows"]] == [bad["workflow_id"]]
    echo_only = await call(client, "get_workflow_history", agent="echo")
    assert [w["workflow_id"] for w in echo_only["workflows"]] == [done["workflow_id"]]
    future = await call(client, "get_workflow_history", since="2999-01-01T00:00:00Z")
    assert future["workflows"] == []
    assert (await call(client, "get_workflow_history", all_scopes=True))["total"] == 2

    assert "list_active_workflows" in await call_error(client, "get_workflow_history", status=["running"])


async def test_list_agents(client: Client) -> None:
    agents = (await call(client, "list_agents"))["agents"]
    names = [a["name"] for a in agents]
    assert "echo" in names and names == sorted(names)
    assert all(a["executor"] == "python" for a in agents)


async def test_tool_metadata_fits_claude_code(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {
        "task_async",
        "check_workflow_status",
        "list_active_workflows",
        "get_workflow_notifications",
        "get_task_result",
        "get_task_log",
        "cancel_task",
        "get_workflow_history",
        "list_agents",
        "schedule_task",
        "list_schedules",
        "update_schedule",
        "delete_schedule",
        "get_schedule_runs",
        "wait_for_tasks",
        "retry_task",
    }
    for tool in tools.values():
        assert tool.description and len(tool.description.encode()) < 2048, tool.name
        assert tool.output_schema is not None, tool.name
        assert tool.annotations is not None, tool.name
    assert tools["check_workflow_status"].annotations.read_only_hint is True  # type: ignore[union-attr]
    assert tools["cancel_task"].annotations.destructive_hint is True  # type: ignore[union-attr]
    assert tools["task_async"].annotations.read_only_hint is False  # type: ignore[union-attr]
    assert tools["task_async"].annotations.idempotent_hint is False  # type: ignore[union-attr]
    assert tools["delete_schedule"].annotations.destructive_hint is True  # type: ignore[union-attr]
    assert tools["list_schedules"].annotations.read_only_hint is True  # type: ignore[union-attr]
    assert len(INSTRUCTIONS.encode()) < 2048


# ---- resources -------------------------------------------------------------------


async def test_resource_read(client: Client) -> None:
    submitted = await submit(client, "echo", "as a resource")
    await wait_status(client, submitted["task_id"], "completed")

    task = await client.read_resource(f"sidequest://tasks/{submitted['task_id']}")
    content = task.contents[0]
    assert content.mime_type == "application/json"
    info = json.loads(content.text)  # type: ignore[union-attr]
    assert info["status"] == "completed" and info["result_preview"] == "as a resource"

    workflow = await client.read_resource(f"sidequest://workflows/{submitted['workflow_id']}")
    winfo = json.loads(workflow.contents[0].text)  # type: ignore[union-attr]
    assert winfo["tasks"][0]["task_id"] == submitted["task_id"]

    with pytest.raises(MCPError, match="unknown task_id"):
        await client.read_resource("sidequest://tasks/t_missing")


async def _read_status(client: Client, uri: str) -> str:
    result = await client.read_resource(uri, cache_mode="bypass")
    return json.loads(result.contents[0].text)["status"]  # type: ignore[union-attr]


async def _wait_push_after_completion(
    client: Client, uri: str, pushes: anyio.abc.ObjectReceiveStream[str]
) -> None:
    """Each push is sent after a durable commit, so some push must be followed by a 'completed' read."""
    with anyio.fail_after(10):
        async for pushed in pushes:
            assert pushed == uri
            if await _read_status(client, uri) == "completed":
                return


@pytest.mark.parametrize("kind", ["tasks", "workflows"])
@pytest.mark.parametrize("mode", MODES)
async def test_resource_updated_pushed_when_task_completes(server: MCPServer, mode: str, kind: str) -> None:
    send, receive = anyio.create_memory_object_stream[str](100)

    async def on_message(message: object) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            send.send_nowait(str(message.params.uri))

    async with Client(server, mode=mode, message_handler=on_message) as client:
        submitted = await submit(client, "sleep", "0.5")
        ident = submitted["task_id"] if kind == "tasks" else submitted["workflow_id"]
        uri = f"sidequest://{kind}/{ident}"
        if mode == "legacy":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                await client.session.subscribe_resource(uri)
            await _wait_push_after_completion(client, uri, receive)
        else:
            async with client.listen(resource_subscriptions=[uri]) as events:

                async def forward() -> None:
                    async for event in events:
                        send.send_nowait(event.uri)  # type: ignore[union-attr]

                async with anyio.create_task_group() as tg:
                    tg.start_soon(forward)
                    await _wait_push_after_completion(client, uri, receive)
                    tg.cancel_scope.cancel()
