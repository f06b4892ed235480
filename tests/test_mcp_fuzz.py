"""Random arguments to every tool: the server answers each call, rejects bad ones cleanly, and a
rejected call leaves the database exactly as it was."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from conftest import wait_for
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mcp import Client

from sidequest.config import AgentConfig, Settings
from sidequest.engine.engine import Engine
from sidequest.models import TaskOptions
from sidequest.server.mcp import build_server

# Only agents that are harmless whatever the prompt (no file writes, no huge allocations, no long sleeps).
SAFE_AGENTS = ("echo", "noop", "fail", "json_result")

TOOL_PARAMS: dict[str, list[str]] = {
    "task_async": ["agent_definition", "prompt", "options"],
    "check_workflow_status": ["task_id", "workflow_id"],
    "list_active_workflows": ["all_scopes", "limit", "offset"],
    "get_workflow_notifications": [
        "since",
        "workflow_id",
        "mark_delivered",
        "include_delivered",
        "all_scopes",
        "limit",
    ],
    "get_task_result": ["task_id", "offset", "max_chars"],
    "cancel_task": ["task_id", "workflow_id"],
    "get_workflow_history": ["status", "agent", "since", "until", "all_scopes", "limit", "offset"],
    "list_agents": [],
}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from(
        ["", "90s", "-1", "2h", "1000d", "high", "completed", "running", "2026-01-01T00:00:00Z"]
    )
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
option_keys = st.sampled_from([*TaskOptions.model_fields, "priorty", "timeout_s", "retries"]) | st.text(
    max_size=8
)
options = st.none() | st.dictionaries(option_keys, values, max_size=4) | values
agents = st.sampled_from([*SAFE_AGENTS, "nope", "", "ECHO"]) | st.text(max_size=12)


@st.composite
def tool_calls(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    tool = draw(st.sampled_from(sorted(TOOL_PARAMS)))
    known = TOOL_PARAMS[tool]
    args: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(known), unique=True)) if known else []:
        if name == "agent_definition":
            args[name] = draw(agents)
        elif name == "options":
            args[name] = draw(options)
        else:
            args[name] = draw(values)
    if draw(st.booleans()):  # the two required task_async arguments, often well-formed
        args.setdefault("agent_definition", draw(agents))
        args.setdefault("prompt", draw(st.text(max_size=40) | st.just("1")))
    args.update(draw(st.dictionaries(st.text(max_size=8), values, max_size=2)))
    return tool, args


near_valid_options = st.fixed_dictionaries(
    {},
    optional={
        "priority": st.sampled_from(["high", "normal", "low", "urgent", 1]),
        "timeout": st.sampled_from(["90s", 30, -1, 0, "1000d", "soon", None]),
        "max_retries": st.integers(min_value=-2, max_value=25),
        "tags": st.lists(st.text(max_size=70), max_size=3),
        "metadata": st.dictionaries(st.text(max_size=5), scalars, max_size=2),
        "idempotency_key": st.text(max_size=10),
        "workflow_name": st.text(max_size=10),
        "workflow_id": st.sampled_from(["wf_nope", ""]),
        "delay": st.sampled_from(["1h", 5, -3]),
        "scope": st.sampled_from(["/fuzz/other", ""]),
        "callback_url": st.sampled_from(["https://example.com/hook", "not a url"]),
        "priorty": st.just("high"),
    },
)


@st.composite
def near_valid_submits(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """Mostly well-formed task_async calls, so accepted submissions are exercised too."""
    args: dict[str, Any] = {
        "agent_definition": draw(st.sampled_from([*SAFE_AGENTS, "nope"])),
        "prompt": draw(st.text(min_size=1, max_size=250)),
    }
    if draw(st.booleans()):
        args["options"] = draw(near_valid_options)
    return "task_async", args


class Harness:
    """A running engine and client driven from hypothesis' synchronous examples through a portal."""

    def __init__(self, portal: BlockingPortal, engine: Engine, client: Client) -> None:
        self.portal, self.engine, self.client = portal, engine, client

    def run(self, tool: str, args: dict[str, Any]) -> str:
        return self.portal.call(self._check_one, tool, args)

    async def _check_one(self, tool: str, args: dict[str, Any]) -> str:
        before = await self._rows()
        result = await self.client.call_tool(tool, args)
        if result.is_error:
            text = result.content[0].text  # type: ignore[union-attr]
            assert text and "Traceback" not in text, text
            assert "internal error" not in text, f"{tool}({args!r}) crashed the handler: {text}"
            assert await self._rows() == before, f"rejected {tool}({args!r}) wrote rows: {text}"
        else:
            assert result.structured_content is not None
            if tool == "task_async":
                await self._settle(result.structured_content)
        still = await self.client.call_tool("list_agents", {})
        assert not still.is_error
        return f"{tool}: {'rejected' if result.is_error else 'accepted'}"

    async def _rows(self) -> dict[str, int]:
        await self.engine.store.flush()
        return await self.engine.store.count_rows()

    async def _settle(self, submitted: dict[str, Any]) -> None:
        """Stop an accepted task and wait until nothing more will be written for it."""
        await self.engine.cancel(workflow_id=submitted["workflow_id"])

        async def quiet() -> bool:
            task = await self.engine.get_task(submitted["task_id"])
            return task.status.finished and len(task.attempt_history or []) == task.attempts

        await wait_for(quiet, timeout=10, what="the cancelled task to settle")


@pytest.fixture(params=["auto", "legacy"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    config = Settings(
        home=tmp_path,
        agents={name: AgentConfig(callable=f"sidequest.testing.agents:{name}") for name in SAFE_AGENTS},
        max_prompt_bytes=200,
        lease_seconds=2.0,
        shutdown_grace=0.5,
    )
    engine = Engine(config)
    with (
        start_blocking_portal(backend="asyncio") as portal,
        portal.wrap_async_context_manager(engine.running()),
    ):
        server = build_server(engine, "/fuzz/project")
        with portal.wrap_async_context_manager(Client(server, mode=request.param)) as client:
            yield Harness(portal, engine, client)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=tool_calls() | near_valid_submits())
def test_random_arguments_never_break_the_server(harness: Harness, call: tuple[str, dict[str, Any]]) -> None:
    tool, args = call
    event(harness.run(tool, args))  # --hypothesis-show-statistics shows the accepted/rejected mix


def test_valid_call_after_garbage(harness: Harness) -> None:
    """After a burst of garbage the server still does real work."""
    for tool in TOOL_PARAMS:
        harness.run(tool, {"limit": "many", "task_id": {"x": 1}, "options": [1]})

    async def submit_and_finish() -> None:
        result = await harness.client.call_tool(
            "task_async", {"agent_definition": "echo", "prompt": "still here"}
        )
        assert not result.is_error
        task_id = result.structured_content["task_id"]  # type: ignore[index]

        async def done() -> bool:
            return (await harness.engine.get_task(task_id)).status == "completed"

        await wait_for(done, what="a valid task after garbage")
        page = await harness.client.call_tool("get_task_result", {"task_id": task_id})
        assert page.structured_content["content"] == "still here"  # type: ignore[index]

    harness.portal.call(submit_and_finish)
