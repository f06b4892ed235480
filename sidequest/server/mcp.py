"""MCP tools and resources: a thin adapter over `Engine`, served over stdio or streamable HTTP.

Every tool calls one engine method and returns the engine's pydantic model, so
the MCP surface adds no behaviour of its own. Errors become `ToolError`s whose
text is the engine's message: the model reads it and can correct its call.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Annotated, Any, Protocol, TypeVar

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated, SubscriptionBus
from mcp_types import (
    CallToolResult,
    EmptyResult,
    InputRequiredResult,
    SubscribeRequestParams,
    TextContent,
    ToolAnnotations,
    UnsubscribeRequestParams,
)
from pydantic import AfterValidator, BaseModel, Field, ValidationError

from sidequest import __version__
from sidequest.config import format_validation_error
from sidequest.engine.errors import EngineError, NotFound, StoreError
from sidequest.engine.notifier import MCP_READER
from sidequest.models import (
    AgentList,
    CancelResult,
    Misfire,
    NotificationPage,
    Overlap,
    ResultPage,
    ScheduleCreated,
    ScheduleDeleted,
    ScheduleInfo,
    SchedulePage,
    ScheduleRuns,
    ScheduleSpec,
    ScheduleUpdate,
    StatusReport,
    TaskInfo,
    TaskLogPage,
    TaskOptions,
    TaskSubmitted,
    WaitMode,
    WaitResult,
    WaitTimeout,
    WorkflowInfo,
    WorkflowPage,
    WorkflowStatus,
    as_utc,
    options_error,
)
from sidequest.storage.base import Committed
from sidequest.suggest import did_you_mean

log = logging.getLogger(__name__)

T = TypeVar("T")

TASK_URI = "sidequest://tasks/{task_id}"
WORKFLOW_URI = "sidequest://workflows/{workflow_id}"
_PUSH_BUFFER = 10_000
"""Pending resource-updated events; beyond this a burst is dropped (they are hints, rows are the truth)."""
_MAX_OFFSET = 1_000_000_000
"""Far past any real list or result; larger numbers only overflow the database's integer types."""
_MAX_CURSOR = 2**63 - 1
_SEND_TIMEOUT = 5.0
"""A legacy client that does not read its stream must not stall pushes to everyone else."""

INSTRUCTIONS = """\
sidequest runs work in durable background agents so you can keep talking to the user.

When: anything likely to take more than ~30 seconds (research, builds, long test runs, \
batch edits, reviews) -> task_async. Short things: just do them.

How:
1. list_agents once to learn the agent names you may launch.
2. task_async(agent_definition, prompt, options) returns a task_id and workflow_id at once. \
The prompt must stand alone: the agent sees nothing of this conversation. Group related tasks \
with options.workflow_name on the first and options.workflow_id on the rest.
3. Keep working. Don't poll in a tight loop: call get_workflow_notifications between your \
other steps (each finished task appears there once), or check_workflow_status no more than \
every 30-60 seconds when you are only waiting.
4. get_task_result(task_id) reads the output; follow next_offset to page through long results.
5. cancel_task stops work the user no longer wants.

Tasks survive restarts and are retried on failure (at-least-once: an agent may run twice). \
Lists show this project's work; pass all_scopes=true to see every project. Resources \
sidequest://tasks/{id} and sidequest://workflows/{id} send resource-updated on every change.
"""


Offset = Annotated[int, Field(ge=0, le=_MAX_OFFSET)]
Options = Annotated[
    dict[str, Any] | None,
    Field(description="task_async options; unknown keys are refused with the accepted ones listed"),
]
"""Validated by `_options`, not by the SDK, so a mistake lists the accepted keys; the schema
published for task_async is TaskOptions' own (`_compact_schemas`)."""
UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]
"""A time without a zone means UTC, as the tool descriptions promise (the store keeps UTC)."""


# ---- error translation ------------------------------------------------------


@contextmanager
def _tool_errors(tool: str) -> Iterator[None]:
    """Turn every failure into a message the model can act on; a bare crash would be masked by the SDK."""
    try:
        yield
    except ToolError:
        raise
    except (EngineError, StoreError) as exc:
        raise ToolError(str(exc)) from exc
    except ValidationError as exc:  # a model built inside a tool from its arguments
        raise ToolError(f"invalid arguments: {format_validation_error(exc)}") from exc
    except Exception as exc:
        log.exception("tool %s failed unexpectedly", tool)
        raise ToolError(
            f"internal error in sidequest ({type(exc).__name__}: {exc}); the request may not have been "
            "applied. The server log on stderr has the traceback; retrying is safe for read-only tools."
        ) from exc


async def _run_tool(tool: str, call: Awaitable[T]) -> T:
    with _tool_errors(tool):
        return await call


def _options(options: dict[str, Any] | None) -> TaskOptions | None:
    if options is None:
        return None
    try:
        return TaskOptions.model_validate(options)
    except ValidationError as exc:
        raise ToolError(f"invalid options: {options_error(exc)}") from None


def _compact(node: Any, in_properties: bool = False) -> Any:
    """A schema without what a model does not need: generated titles, and `anyOf [X, null]`
    with default null (leaving the key out means the same). The tools' definitions ride on every
    request a client makes, so their size is paid on every turn."""
    if isinstance(node, list):
        return [_compact(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _compact(v, k == "properties") for k, v in node.items() if in_properties or k != "title"}
    alternatives = out.get("anyOf")
    if isinstance(alternatives, list) and len(alternatives) == 2 and {"type": "null"} in alternatives:
        other = next(a for a in alternatives if a != {"type": "null"})
        del out["anyOf"]
        if "default" in out and out["default"] is None:
            del out["default"]
        out = {**other, **out}
    return out


def _compact_schemas(server: MCPServer) -> None:
    """Compact every tool's input schema, and publish TaskOptions' schema for task_async's
    `options` (validated in the tool, see `Options`). MCPServer has no public hook for this."""
    task_options = TaskOptions.model_json_schema(ref_template="#/$defs/{model}")
    defs = task_options.pop("$defs", {})
    for tool in server._tool_manager.list_tools():
        schema = tool.parameters
        if tool.name == "task_async":
            schema["properties"]["options"] = task_options
            schema["$defs"] = {**schema.get("$defs", {}), **defs}
        tool.parameters = _compact(schema)


def _without_nulls(model: BaseModel) -> CallToolResult:
    """A reply with its null fields left out: a model reads every token, and a column of nulls
    says nothing. The output schema is still the model's (every nullable field is optional)."""
    data = model.model_dump(mode="json", exclude_none=True)
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(data, ensure_ascii=False))],
        structured_content=data,
    )


# ---- resource-updated push, both protocol eras ------------------------------


class ResourcePusher:
    """Fan out "resource updated" for changed tasks and workflows to every subscribed client.

    The engine calls `on_commit` synchronously on the event loop after each
    durable commit; it only enqueues. Pumps (one per active server lifespan)
    do the sending, so a slow client never blocks the engine's writer.
    2026 clients subscribe through the bus (`subscriptions/listen`); 2025
    clients through `resources/subscribe`, which MCPServer does not register.
    """

    def __init__(self, server: MCPServer, bus: SubscriptionBus) -> None:
        self._bus = bus
        self._legacy: dict[str, list[ServerSession]] = defaultdict(list)
        self._send: ObjectSendStream[str]
        self._receive: ObjectReceiveStream[str]
        self._send, self._receive = anyio.create_memory_object_stream[str](_PUSH_BUFFER)
        self._pumps = 0
        low = server._lowlevel_server  # no public hook for legacy subscribe in mcp 2.3
        low.add_request_handler("resources/subscribe", SubscribeRequestParams, self._on_subscribe)
        low.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, self._on_unsubscribe)

    # engine side

    def on_commit(self, committed: Committed) -> None:
        if not self._pumps:
            return  # nobody connected: nothing to tell
        uris = [TASK_URI.format(task_id=t) for t in sorted(committed.task_ids)]
        uris += [WORKFLOW_URI.format(workflow_id=w) for w in sorted(committed.workflow_ids)]
        for uri in uris:
            try:
                self._send.send_nowait(uri)
            except anyio.WouldBlock:
                log.warning("resource-updated buffer full; dropping update for %s", uri)
                return

    # client side (legacy)

    async def _on_subscribe(
        self, ctx: ServerRequestContext[Any], params: SubscribeRequestParams
    ) -> EmptyResult:
        uri = str(params.uri)
        conn = ctx.session._connection
        sessions = self._legacy[uri]
        if all(s._connection is not conn for s in sessions):
            sessions.append(ctx.session)
            # Sending to a closed session silently does nothing, so forget it when the connection ends.
            conn.exit_stack.callback(self._drop, uri, conn)
        return EmptyResult()

    async def _on_unsubscribe(
        self, ctx: ServerRequestContext[Any], params: UnsubscribeRequestParams
    ) -> EmptyResult:
        self._drop(str(params.uri), ctx.session._connection)
        return EmptyResult()

    def _drop(self, uri: str, conn: object) -> None:
        remaining = [s for s in self._legacy.get(uri, []) if s._connection is not conn]
        if remaining:
            self._legacy[uri] = remaining
        else:
            self._legacy.pop(uri, None)

    # sending

    @asynccontextmanager
    async def pumping(self) -> AsyncIterator[None]:
        """Run one pump for as long as a server lifespan is active."""
        self._pumps += 1
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, self._receive.clone())
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._pumps -= 1

    async def _pump(self, receive: ObjectReceiveStream[str]) -> None:
        async with receive:
            async for uri in receive:
                await self.resource_updated(uri)

    async def resource_updated(self, uri: str) -> None:
        await self._bus.publish(ResourceUpdated(uri=uri))
        for session in list(self._legacy.get(uri, [])):
            try:
                with anyio.fail_after(_SEND_TIMEOUT):
                    await session.send_resource_updated(uri)
            except Exception:
                log.info("dropping unreachable legacy subscriber for %s", uri)
                self._drop(uri, session._connection)


# ---- the server ---------------------------------------------------------------


def _read_only(title: str) -> ToolAnnotations:
    return ToolAnnotations(
        title=title, read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
    )


class Backend(Protocol):
    """What the tools call: the `Engine` itself (daemon, --embedded) or a `DaemonClient` (stdio front).

    Both have the same methods and return the same models, so the tools exist once.
    """

    def add_listener(self, listener: Callable[[Committed], None]) -> Callable[[], None]: ...
    async def submit(
        self, agent: str, prompt: str, options: TaskOptions | None = None, *, project: str | None = None
    ) -> TaskSubmitted: ...
    async def status(self, task_id: str | None = None, workflow_id: str | None = None) -> StatusReport: ...
    async def get_task(self, task_id: str) -> TaskInfo: ...
    async def get_workflow(self, workflow_id: str) -> WorkflowInfo: ...
    async def get_result(self, task_id: str, offset: int = 0, max_chars: int = 20_000) -> ResultPage: ...
    async def get_task_log(self, task_id: str, offset: int = 0, limit: int = 100) -> TaskLogPage: ...
    async def cancel(self, task_id: str | None = None, workflow_id: str | None = None) -> CancelResult: ...
    async def list_active_workflows(
        self, scope: str | None = None, all_scopes: bool = False, limit: int = 20, offset: int = 0
    ) -> WorkflowPage: ...
    async def workflow_history(
        self,
        scope: str | None = None,
        all_scopes: bool = False,
        status: list[WorkflowStatus] | None = None,
        agent: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> WorkflowPage: ...
    async def notifications(
        self,
        scope: str | None = None,
        all_scopes: bool = False,
        since: int | None = None,
        workflow_id: str | None = None,
        mark_delivered: bool = True,
        include_delivered: bool = False,
        limit: int = 50,
        *,
        reader: str,
    ) -> NotificationPage: ...
    async def agent_list(self, scope: str | None = None, project: str | None = None) -> AgentList: ...
    async def schedule_task(
        self, spec: ScheduleSpec, scope: str | None = None, *, project: str | None = None
    ) -> ScheduleCreated: ...
    async def list_schedules(
        self, scope: str | None = None, all_scopes: bool = False, limit: int = 20, offset: int = 0
    ) -> SchedulePage: ...
    async def update_schedule(
        self, schedule_id: str, change: ScheduleUpdate, *, project: str | None = None
    ) -> ScheduleInfo: ...
    async def delete_schedule(self, schedule_id: str) -> ScheduleDeleted: ...
    async def wait_for_tasks(
        self,
        task_ids: list[str] | None = None,
        workflow_id: str | None = None,
        mode: WaitMode = "any",
        timeout: float = 30.0,
    ) -> WaitResult: ...
    async def retry(self, task_id: str) -> TaskInfo: ...
    async def schedule_runs(self, schedule_id: str, limit: int = 20, offset: int = 0) -> ScheduleRuns: ...


class _Server(MCPServer):
    """MCPServer whose refusal of an unknown tool name suggests the close one, as an unknown agent does:
    a model that typed `task_asnyc` should not have to call tools/list to find its typo."""

    _tool_names: frozenset[str] | None = None

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        if self._tool_names is None:  # tools are registered once, at build; read them on first use
            self._tool_names = frozenset(tool.name for tool in await self.list_tools())
        if name not in self._tool_names:
            hint = did_you_mean(name, self._tool_names)
            raise ToolError(
                f"Unknown tool: {name[:100]}; {hint + ' ' if hint else ''}"
                f"tools: {', '.join(sorted(self._tool_names))}"
            )
        return await super().call_tool(name, arguments, context)


def build_server(
    engine: Backend, default_scope: str, *, trusted: bool = True, notice: str | None = None
) -> MCPServer:
    """The MCP server over an engine (or the daemon's client); `default_scope` is this client's project.

    `trusted=False` when the scope is not a project a user connected from (the daemon's own
    /mcp, whose working directory is the data dir): agents may then not work in it.
    `notice` is added to the instructions the client's model reads (a version mismatch).
    """
    project = default_scope if trusted else None
    bus = InMemorySubscriptionBus()

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[None]:
        async with pusher.pumping():
            yield

    server = _Server(
        "sidequest",
        version=__version__,
        instructions=INSTRUCTIONS + (f"\nNOTE: {notice}\n" if notice else ""),
        lifespan=lifespan,
        subscriptions=bus,
    )
    pusher = ResourcePusher(server, bus)
    engine.add_listener(pusher.on_commit)
    _register_tools(server, engine, default_scope, project)
    _register_resources(server, engine)
    _compact_schemas(server)
    return server


def _register_resources(server: MCPServer, engine: Backend) -> None:
    @server.resource(
        TASK_URI,
        name="task",
        mime_type="application/json",
        description="One task's status, progress, result preview and attempt history (TaskInfo JSON).",
    )
    async def read_task(task_id: str) -> str:
        return await _read_resource(lambda: engine.get_task(task_id))

    @server.resource(
        WORKFLOW_URI,
        name="workflow",
        mime_type="application/json",
        description="A workflow and all its tasks (WorkflowInfo JSON).",
    )
    async def read_workflow(workflow_id: str) -> str:
        return await _read_resource(lambda: engine.get_workflow(workflow_id))


async def _read_resource(read: Any) -> str:
    try:
        model: BaseModel = await read()
    except NotFound as exc:
        raise ResourceNotFoundError(str(exc)) from exc
    except EngineError as exc:
        raise ResourceError(str(exc)) from exc
    except Exception as exc:
        log.exception("reading a resource failed unexpectedly")
        raise ResourceError(f"internal error in sidequest ({type(exc).__name__}: {exc})") from exc
    return json.dumps(model.model_dump(mode="json"))


def _register_tools(server: MCPServer, engine: Backend, default_scope: str, project: str | None) -> None:
    """`project` is the caller's own project (trusted); None when this server is not a project's
    (the daemon's /mcp): then a task may run only inside allowed_roots."""

    @server.tool(
        name="task_async",
        description=(
            "Start a task in a durable background agent; returns at once with task_id and workflow_id. "
            "For work likely to take over ~30 s. agent_definition: a name from list_agents. The prompt "
            "must stand alone (the agent does not see this conversation). options: workflow_name starts "
            "a named workflow, workflow_id adds to one, idempotency_key returns the earlier task instead "
            "of a duplicate. Read `warnings`. Then keep working: get_workflow_notifications between "
            "steps, or wait_for_tasks; then get_task_result."
        ),
        annotations=ToolAnnotations(
            title="Start background task",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=True,
        ),
    )
    async def task_async(
        agent_definition: Annotated[
            str,
            Field(description="agent name from list_agents, or the path of an agent file in an agent folder"),
        ],
        prompt: Annotated[str, Field(description="complete, self-contained instructions for the agent")],
        options: Options = None,
    ) -> TaskSubmitted:
        return await _run_tool(
            "task_async",
            engine.submit(
                agent_definition,
                prompt,
                TaskOptions.scoped(_options(options), default_scope),
                project=project,
            ),
        )

    @server.tool(
        name="check_workflow_status",
        description=(
            "Status of one task (task_id) or of a workflow and its tasks (workflow_id): progress, "
            "attempts, errors, a result preview, elapsed time and a hint of what to do next. Poll no more "
            "than every 30-60 s; prefer wait_for_tasks or get_workflow_notifications."
        ),
        annotations=_read_only("Check task or workflow status"),
    )
    async def check_workflow_status(
        task_id: str | None = None, workflow_id: str | None = None
    ) -> Annotated[CallToolResult, StatusReport]:
        report = await _run_tool(
            "check_workflow_status", engine.status(task_id=task_id, workflow_id=workflow_id)
        )
        return _without_nulls(report)

    @server.tool(
        name="list_active_workflows",
        description=(
            "This project's workflows with unfinished tasks, newest first, with task counts. Page with "
            "offset = next_offset."
        ),
        annotations=_read_only("List active workflows"),
    )
    async def list_active_workflows(
        all_scopes: bool = False,
        limit: Annotated[int, Field(ge=1, le=100)] = 20,
        offset: Offset = 0,
    ) -> WorkflowPage:
        return await _run_tool(
            "list_active_workflows",
            engine.list_active_workflows(
                scope=default_scope, all_scopes=all_scopes, limit=limit, offset=offset
            ),
        )

    @server.tool(
        name="get_workflow_notifications",
        description=(
            "What finished since you last asked (this project's events, oldest first), each once "
            "unless include_delivered=true; since=N returns everything after cursor N again (repeat a "
            "lost reply). Cheap: call it between steps instead of polling status."
        ),
        annotations=ToolAnnotations(
            title="Get notifications",
            read_only_hint=False,  # marks events delivered
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=False,
        ),
    )
    async def get_workflow_notifications(
        since: Annotated[
            int | None, Field(ge=0, le=_MAX_CURSOR, description="next_cursor of the previous call")
        ] = None,
        workflow_id: str | None = None,
        mark_delivered: bool = True,
        include_delivered: bool = False,
        all_scopes: bool = False,
        limit: Annotated[int, Field(ge=1, le=200)] = 50,
    ) -> NotificationPage:
        return await _run_tool(
            "get_workflow_notifications",
            engine.notifications(
                scope=default_scope,
                all_scopes=all_scopes,
                since=since,
                workflow_id=workflow_id,
                mark_delivered=mark_delivered,
                include_delivered=include_delivered,
                limit=limit,
                reader=MCP_READER,  # decided here, never by the model's arguments
            ),
        )

    @server.tool(
        name="get_task_result",
        description=(
            "Read a finished task's output, a page at a time: while next_offset is not null, call again "
            "with offset=next_offset. A failed task has its error in error."
        ),
        annotations=_read_only("Get task result"),
    )
    async def get_task_result(
        task_id: str,
        offset: Offset = 0,
        max_chars: Annotated[int, Field(ge=1, le=50_000)] = 20_000,
    ) -> ResultPage:
        return await _run_tool(
            "get_task_result", engine.get_result(task_id, offset=offset, max_chars=max_chars)
        )

    @server.tool(
        name="get_task_log",
        description="A task's run log (attempts, turns, tool calls, errors, retries), oldest first; "
        "page with offset=next_offset.",
        annotations=_read_only("Get task log"),
    )
    async def get_task_log(
        task_id: str, offset: Offset = 0, limit: Annotated[int, Field(ge=1, le=1000)] = 100
    ) -> TaskLogPage:
        return await _run_tool("get_task_log", engine.get_task_log(task_id, offset=offset, limit=limit))

    @server.tool(
        name="cancel_task",
        description=(
            "Cancel a task (task_id) or every unfinished task of a workflow (workflow_id). Running "
            "agents are stopped; finished tasks are listed in already_finished."
        ),
        annotations=ToolAnnotations(
            title="Cancel task or workflow",
            read_only_hint=False,
            destructive_hint=True,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    )
    async def cancel_task(task_id: str | None = None, workflow_id: str | None = None) -> CancelResult:
        return await _run_tool("cancel_task", engine.cancel(task_id=task_id, workflow_id=workflow_id))

    @server.tool(
        name="wait_for_tasks",
        description=(
            "Wait until any (mode='any') or all (mode='all') of task_ids, or of a workflow's tasks, "
            "finished, or timeout seconds (at most 50) passed; returns their statuses. Use it instead "
            "of polling when you have nothing else to do; call again to keep waiting."
        ),
        annotations=_read_only("Wait for tasks"),
    )
    async def wait_for_tasks(
        task_ids: list[str] | None = None,
        workflow_id: str | None = None,
        mode: WaitMode = "any",
        timeout: WaitTimeout = 30.0,
    ) -> WaitResult:
        return await _run_tool(
            "wait_for_tasks",
            engine.wait_for_tasks(task_ids=task_ids, workflow_id=workflow_id, mode=mode, timeout=timeout),
        )

    @server.tool(
        name="retry_task",
        description=(
            "Queue a failed or cancelled task again (same task, history kept, fresh retries); its "
            "workflow runs again."
        ),
        annotations=ToolAnnotations(
            title="Retry task",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=True,
        ),
    )
    async def retry_task(task_id: str) -> TaskInfo:
        return await _run_tool("retry_task", engine.retry(task_id))

    @server.tool(
        name="get_workflow_history",
        description=(
            "Finished workflows of this project, newest first, filtered by status, agent or creation "
            "time (since/until, ISO 8601, UTC if no zone). Page with offset = next_offset."
        ),
        annotations=_read_only("Workflow history"),
    )
    async def get_workflow_history(
        status: list[WorkflowStatus] | None = None,
        agent: str | None = None,
        since: UtcDatetime | None = None,
        until: UtcDatetime | None = None,
        all_scopes: bool = False,
        limit: Annotated[int, Field(ge=1, le=100)] = 20,
        offset: Offset = 0,
    ) -> WorkflowPage:
        return await _run_tool(
            "get_workflow_history",
            engine.workflow_history(
                scope=default_scope,
                all_scopes=all_scopes,
                status=status,
                agent=agent,
                since=since,
                until=until,
                limit=limit,
                offset=offset,
            ),
        )

    @server.tool(
        name="list_agents",
        description=(
            "The agents you may launch with task_async (from .claude/agents/ in the project and your "
            "home, and the sidequest config). Call it once before your first task_async; `problems` "
            "lists broken agent files."
        ),
        annotations=_read_only("List agents"),
    )
    async def list_agents() -> AgentList:
        return await _run_tool("list_agents", engine.agent_list(default_scope, project))

    _register_schedule_tools(server, engine, default_scope, project)


def _register_schedule_tools(
    server: MCPServer, engine: Backend, default_scope: str, project: str | None
) -> None:
    @server.tool(
        name="schedule_task",
        description=(
            "Run an agent on a cron schedule ('minute hour day month weekday', e.g. '0 9 * * 1-5'), "
            "unattended; timezone is an IANA name (default UTC). Each due time starts one task, once. "
            "overlap (a run due while the last is unfinished): skip, queue or allow. misfire (after "
            "downtime): run_once or skip. Times are ISO 8601, UTC if no zone. options: as task_async "
            "(not workflow_id, idempotency_key, delay, not_before). Show the user the next fire times."
        ),
        annotations=ToolAnnotations(
            title="Schedule a recurring task",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=True,
        ),
    )
    async def schedule_task(
        agent_definition: Annotated[str, Field(description="agent name from list_agents")],
        prompt: Annotated[str, Field(description="complete, self-contained instructions for each run")],
        cron: Annotated[str, Field(description="e.g. '0 9 * * 1-5' (weekdays 09:00)")],
        timezone: str = "UTC",
        name: str | None = None,
        options: Options = None,
        overlap: Overlap = "skip",
        misfire: Misfire = "run_once",
        start_at: UtcDatetime | None = None,
        end_at: UtcDatetime | None = None,
        max_runs: Annotated[int | None, Field(ge=1, le=1_000_000)] = None,
    ) -> ScheduleCreated:
        with _tool_errors("schedule_task"):
            spec = ScheduleSpec(
                agent_definition=agent_definition,
                prompt=prompt,
                cron=cron,
                timezone=timezone,
                name=name,
                options=_options(options),
                overlap=overlap,
                misfire=misfire,
                start_at=start_at,
                end_at=end_at,
                max_runs=max_runs,
            )
        return await _run_tool("schedule_task", engine.schedule_task(spec, default_scope, project=project))

    @server.tool(
        name="list_schedules",
        description=(
            "This project's cron schedules, newest first: state, next and last run and its status, "
            "runs so far. Page with offset = next_offset."
        ),
        annotations=_read_only("List schedules"),
    )
    async def list_schedules(
        all_scopes: bool = False,
        limit: Annotated[int, Field(ge=1, le=100)] = 20,
        offset: Offset = 0,
    ) -> SchedulePage:
        return await _run_tool(
            "list_schedules",
            engine.list_schedules(scope=default_scope, all_scopes=all_scopes, limit=limit, offset=offset),
        )

    @server.tool(
        name="update_schedule",
        description=(
            "Change a schedule: paused=true pauses it, paused=false resumes it (no catch-up); other "
            "fields as schedule_task. Only the fields you give change."
        ),
        annotations=ToolAnnotations(
            title="Change, pause or resume a schedule",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    )
    async def update_schedule(
        schedule_id: str,
        paused: bool | None = None,
        cron: str | None = None,
        timezone: str | None = None,
        prompt: str | None = None,
        name: str | None = None,
        options: Options = None,
        overlap: Overlap | None = None,
        misfire: Misfire | None = None,
        start_at: UtcDatetime | None = None,
        end_at: UtcDatetime | None = None,
        max_runs: Annotated[int | None, Field(ge=1, le=1_000_000)] = None,
    ) -> ScheduleInfo:
        given = {
            "paused": paused,
            "cron": cron,
            "timezone": timezone,
            "prompt": prompt,
            "name": name,
            "options": _options(options),
            "overlap": overlap,
            "misfire": misfire,
            "start_at": start_at,
            "end_at": end_at,
            "max_runs": max_runs,
        }
        with _tool_errors("update_schedule"):
            change = ScheduleUpdate.model_validate({k: v for k, v in given.items() if v is not None})
        return await _run_tool(
            "update_schedule", engine.update_schedule(schedule_id, change, project=project)
        )

    @server.tool(
        name="delete_schedule",
        description="Delete a schedule: no more runs. Tasks it already started are kept (and keep running).",
        annotations=ToolAnnotations(
            title="Delete schedule",
            read_only_hint=False,
            destructive_hint=True,
            idempotent_hint=False,
            open_world_hint=False,
        ),
    )
    async def delete_schedule(schedule_id: str) -> ScheduleDeleted:
        return await _run_tool("delete_schedule", engine.delete_schedule(schedule_id))

    @server.tool(
        name="get_schedule_runs",
        description=(
            "The tasks a schedule started, newest first, with status and result preview. Page with "
            "offset = next_offset."
        ),
        annotations=_read_only("Schedule run history"),
    )
    async def get_schedule_runs(
        schedule_id: str,
        limit: Annotated[int, Field(ge=1, le=100)] = 20,
        offset: Offset = 0,
    ) -> ScheduleRuns:
        return await _run_tool(
            "get_schedule_runs", engine.schedule_runs(schedule_id, limit=limit, offset=offset)
        )
