"""REST API (mounted at /api/v1): the MCP tools' engine calls over plain HTTP for the CLI and other clients.

A thin adapter like `sidequest.server.mcp`: every route calls one engine method
and returns the same pydantic model the tool returns, so both surfaces accept
and answer the same things. Authentication is the mounting app's job.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Annotated, Any, Final, Protocol
from urllib.parse import unquote

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from fastapi import Body, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BeforeValidator
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sidequest import __version__
from sidequest.engine.admission import default_scope
from sidequest.engine.engine import Engine
from sidequest.engine.errors import (
    EngineError,
    InvalidRequest,
    NotFinished,
    NotFound,
    QueueFull,
    StoreUnavailable,
    Unavailable,
)
from sidequest.engine.notifier import DEFAULT_READER
from sidequest.engine.reads import MAX_OFFSET
from sidequest.models import (
    AckRequest,
    AckResult,
    AgentList,
    ApiError,
    CancelResult,
    DaemonStatus,
    EnvNames,
    GcReport,
    GcRequest,
    NotificationPage,
    ReloadResult,
    ResultPage,
    ScheduleCreated,
    ScheduleDeleted,
    ScheduleInfo,
    SchedulePage,
    ScheduleRuns,
    ScheduleSpec,
    ScheduleUpdate,
    StatusReport,
    TaskCreate,
    TaskInfo,
    TaskLogEvent,
    TaskLogPage,
    TaskOptions,
    TaskSubmitted,
    WaitRequest,
    WaitResult,
    WorkerList,
    WorkflowInfo,
    WorkflowPage,
    WorkflowStatus,
    as_utc,
)
from sidequest.storage.base import Committed, TaskEventRecord

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
"""Where the app is mounted; its OpenAPI document names this as the server URL."""
PROJECT_HEADER = "X-Sidequest-Project"
READER_HEADER = "X-Sidequest-Reader"
_MAX_SCOPE = 1000
"""The header names a scope, so it has the limit of TaskOptions.scope."""
_MAX_OFFSET = 1_000_000_000
"""As in the MCP tools: far past any real list or result."""
_SSE_BUFFER = 1000
"""Commits queued per event-stream client; past this the client is told to re-read instead."""
_SSE_PING_SECONDS = 15
_SSE_SHUTDOWN_GRACE = 2.0
"""How long a stream may take to end itself at shutdown before it is cut off."""
_MAX_ERRORS_LISTED = 20

_OVERFLOW: Final = object()


def _utc(value: datetime) -> datetime:
    """As `as_utc`, but a time whose offset pushes it past year 1 or 9999 is bad input, not a crash."""
    try:
        return as_utc(value)
    except OverflowError as exc:
        raise ValueError("the time is out of range once converted to UTC") from exc


def _iso_only(value: Any) -> Any:
    """The documented format is ISO 8601; pydantic would also read a bare number as a Unix time,
    which the OpenAPI document does not promise (and a typo like `since=2026` would silently
    mean 1970)."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, int | float) or (isinstance(text, str) and _looks_numeric(text)):
        raise ValueError("must be an ISO 8601 time such as 2026-12-05T10:00:00Z, not a number")
    return value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


UtcDatetime = Annotated[datetime, BeforeValidator(_iso_only), AfterValidator(_utc)]
Offset = Annotated[int, Query(ge=0, le=_MAX_OFFSET)]

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ApiError, "description": "The engine refused the request (the message says why)"},
    404: {"model": ApiError, "description": "No such task, workflow, schedule or route"},
    409: {"model": ApiError, "description": "The task has not finished: it has no result yet"},
    415: {"model": ApiError, "description": "The body is not JSON"},
    422: {"model": ApiError, "description": "A parameter or the body does not match the schema"},
    500: {"model": ApiError, "description": "A bug in sidequest; the server log has the traceback"},
    503: {"model": ApiError, "description": "The engine cannot serve this now; retry later"},
}

_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}

EVENTS_DESCRIPTION = """\
Server-sent events: a hint whenever tasks, workflows or notifications change, so a client can
re-read instead of polling. Events (every scope; `data` is one JSON line):

- `hello`: sent first, once the stream is listening: `{"version": "...", "pid": 123}`.
  Read the state you care about after it; nothing committed from then on is missed.
- `update`: one per durable commit:
  `{"task_ids": [...], "workflow_ids": [...], "notification_cursor": 42 | null}`
  (ids sorted; the cursor is the highest notification in the commit, null if none).
- `task_log`: only on a stream opened with `?task_id=t_…`: one per new entry of that task's run
  log, as soon as it is durable: `{"task_id": "t_…", "seq": 7, "at": "…", "attempt": 1, "kind": "stderr",
  "message": "…", "data": {…} | null}`. Read /tasks/{id}/events after `hello` for the entries before.
- `overflow`: the client fell more than 1000 commits behind and some updates were dropped:
  re-read everything you track.

Comment lines (`: ping - <time>`) keep the connection alive every 15 seconds. The stream ends when the
server shuts down; reconnect and re-read.
"""


# ---- errors -------------------------------------------------------------------


def _printable(text: str) -> str:
    """Messages can quote client input; lone surrogates would break JSON encoding."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ApiError(code=code, message=_printable(message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def format_request_errors(errors: Sequence[Any]) -> str:
    """One clause per bad field, named by where it was (`'query.limit': ...`), like config errors."""
    parts = []
    for err in errors[:_MAX_ERRORS_LISTED]:
        loc = [str(p) for p in err.get("loc", ())]
        kind = err.get("type")
        if kind == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "invalid JSON")
            at = f" at position {loc[1]}" if len(loc) > 1 else ""
            parts.append(f"the body is not valid JSON: {detail}{at}")
            continue
        where = ".".join(loc) or "(request)"
        if kind == "extra_forbidden":
            parts.append(f"unknown key '{where}'")
        else:
            parts.append(f"'{where}': {err.get('msg', 'invalid')}")
    if len(errors) > _MAX_ERRORS_LISTED:
        parts.append(f"and {len(errors) - _MAX_ERRORS_LISTED} more")
    return "; ".join(parts) or "invalid request"


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    content_type = request.headers.get("content-type")
    if any(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors) and not _is_json(content_type):
        # FastAPI left a non-JSON body unparsed; "not a dictionary" would hide the real mistake.
        return _error(
            415,
            "unsupported_media_type",
            f"send the body as JSON with Content-Type: application/json (got {content_type or 'none'})",
        )
    return _error(422, "invalid_request", format_request_errors(errors))


async def _on_overflow(request: Request, exc: Exception) -> Response:
    """A time or number so extreme that converting it overflows (year 1 at +05:00 in UTC) is bad input."""
    log.info("%s %r: %r", request.method, request.url.path, exc)
    return _error(422, "invalid_request", f"a value in the request is out of range: {exc}")


async def _on_engine_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineError)
    if isinstance(exc, NotFound):
        status = 404
    elif isinstance(exc, NotFinished):
        status = 409
    elif isinstance(exc, QueueFull):
        status = 429
    elif isinstance(exc, Unavailable):
        status = 503
    else:
        status = 400
    return _error(status, exc.code, str(exc))


async def _on_store_unavailable(request: Request, exc: Exception) -> Response:
    """The store failed: the daemon is stopping (fail-stop). 503 tells clients to come back."""
    return _error(503, StoreUnavailable.code, str(exc))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes, wrong methods and unreadable bodies answer in the same shape as everything else."""
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "internal" if exc.status_code >= 500 else "invalid_request")
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return _error(exc.status_code, code, message, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path: Starlette names only the first route's.

    /schedules/{id} is three routes (GET, PATCH, DELETE), so its 405 would otherwise deny two of them.
    """
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


class _InternalErrors:
    """Answer an unexpected exception with a JSON 500, logged once.

    Starlette's own 500 handler re-raises after answering, so the mounting app
    would log it again and answer in its own shape.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.exception("%s %r failed unexpectedly", scope.get("method"), scope.get("path"))
            if started:
                return  # mid-response: all we can do is end it
            response = _error(
                500,
                "internal",
                f"internal error in sidequest ({type(exc).__name__}: {exc}); the request may not have "
                "been applied. The server log has the traceback.",
            )
            await response(scope, receive, send)


# ---- the caller's project -------------------------------------------------------


async def _request_project(
    project: Annotated[
        str | None,
        Header(
            alias=PROJECT_HEADER,
            min_length=1,
            max_length=_MAX_SCOPE,
            description="The calling client's project directory (absolute path, percent-encoded "
            "UTF-8, so '%' itself is '%25'): the default scope for this request; without it, the "
            "server's own project.",
        ),
    ] = None,
) -> str | None:
    """The client's project: trusted for this request only (the caller holds the token; a
    model-typed `options.scope` travels in the body and is checked against it).

    Async on purpose: FastAPI runs a sync dependency in a worker thread, a hop that cost every
    request more than the dependency's work (and contends with the store's writer thread).
    """
    if project is None:
        return None
    try:
        project = unquote(project, errors="strict") if "%" in project else project  # headers are ASCII
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{PROJECT_HEADER} is not percent-encoded UTF-8: {exc.reason}") from exc
    if not os.path.isabs(project) or "\x00" in project:
        raise InvalidRequest(f"{PROJECT_HEADER} must be an absolute path, got {project!r}")
    return os.path.normpath(project)


CallerProject = Annotated[str | None, Depends(_request_project)]


async def _request_scope(project: CallerProject) -> str:
    """The client's project is the default scope, as it is for the MCP front it connected from;
    without the header, the server's own directory (a label: it makes nothing trusted)."""
    return project or default_scope()


CallerScope = Annotated[str, Depends(_request_scope)]
TaskId = Annotated[str, Path(description="a task_id from POST /tasks")]
WorkflowId = Annotated[str, Path(description="a workflow_id from POST /tasks")]
ScheduleId = Annotated[str, Path(description="a schedule_id (sch_…) from POST /schedules")]
AllScopes = Annotated[bool, Query(description="every project's, not only the caller's")]
Reader = Annotated[
    str,
    Header(
        alias=READER_HEADER,
        description="Whose deliveries this request reads and acknowledges (1-64 letters, digits, '.', "
        "'_' or '-'), within the caller's project: each reader gets every notification once, whatever "
        "other readers did. sidequest's own MCP front sends 'mcp', its CLI 'cli'.",
    ),
]


# ---- server-sent events -----------------------------------------------------------


def _update_data(committed: Committed) -> str:
    cursors = [n.cursor for n in committed.notifications]
    return json.dumps(
        {
            "task_ids": sorted(committed.task_ids),
            "workflow_ids": sorted(committed.workflow_ids),
            "notification_cursor": max(cursors) if cursors else None,
        }
    )


def _log_data(entry: TaskEventRecord) -> str:
    event = TaskLogEvent(
        seq=entry.seq,
        at=entry.logged_at,
        attempt=entry.attempt,
        kind=entry.kind,
        message=entry.message,
        data=entry.data,
    )
    return json.dumps({"task_id": entry.task_id, **event.model_dump(mode="json")})


class _OpenStreams:
    """The shutdown events of the open event streams, so the server can end them all at once."""

    def __init__(self) -> None:
        self.closed = False
        self.events: set[anyio.Event] = set()

    def close(self) -> None:
        self.closed = True
        for event in list(self.events):
            event.set()


class _EventStream:
    """One client's events. The engine's listener only enqueues, so a slow client never stalls a commit.

    At server shutdown the stream ends itself rather than being cut off mid-chunk:
    `shutdown` is set (by `close_event_streams`, or by sse-starlette when it sees
    uvicorn's own signal handling), the watcher closes the queue, and the generator
    returns after what is queued. uvicorn's graceful shutdown waits for open
    responses, so an endless one would hold it up.
    """

    def __init__(self, engine: Engine, streams: _OpenStreams, task_id: str | None = None) -> None:
        self._engine = engine
        self._streams = streams
        self._task_id = task_id
        """Send this task's run-log entries as `task_log` events (None: no log entries)."""
        self._send: ObjectSendStream[object]
        self._receive: ObjectReceiveStream[object]
        self._send, self._receive = anyio.create_memory_object_stream[object](_SSE_BUFFER)
        self._shutdown = anyio.Event()
        streams.events.add(self._shutdown)
        if streams.closed:
            self._shutdown.set()

    def response(self) -> EventSourceResponse:
        return EventSourceResponse(
            self._events(),
            ping=_SSE_PING_SECONDS,
            shutdown_event=self._shutdown,
            shutdown_grace_period=_SSE_SHUTDOWN_GRACE,
            data_sender_callable=self._close_on_shutdown,
        )

    def _on_commit(self, committed: Committed) -> None:
        logged = self._task_id is not None and any(e.task_id == self._task_id for e in committed.task_events)
        if not (committed.task_ids or committed.workflow_ids or committed.notifications or logged):
            return
        try:
            self._send.send_nowait(committed)
        except anyio.WouldBlock:
            # Too far behind: what is queued is stale anyway; one overflow makes the client re-read.
            while True:
                try:
                    self._receive.receive_nowait()
                except anyio.WouldBlock:
                    break
            self._send.send_nowait(_OVERFLOW)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    async def _close_on_shutdown(self) -> None:
        try:
            await self._shutdown.wait()
        finally:
            self._send.close()
            self._streams.events.discard(self._shutdown)

    async def _events(self) -> AsyncIterator[ServerSentEvent]:
        remove = self._engine.add_listener(self._on_commit)
        try:
            with self._receive:
                hello = {"version": __version__, "pid": os.getpid()}
                yield ServerSentEvent(event="hello", data=json.dumps(hello))
                async for item in self._receive:
                    if item is _OVERFLOW:
                        yield ServerSentEvent(event="overflow", data="{}")
                    else:
                        assert isinstance(item, Committed)
                        for entry in item.task_events:
                            if entry.task_id == self._task_id:
                                yield ServerSentEvent(event="task_log", data=_log_data(entry))
                        if item.task_ids or item.workflow_ids or item.notifications:
                            yield ServerSentEvent(event="update", data=_update_data(item))
        finally:
            remove()
            self._send.close()
            self._streams.events.discard(self._shutdown)


# ---- the app ----------------------------------------------------------------------


class ConfigControl(Protocol):
    """The daemon's configuration (sidequest.reload.Reloader): reloaded on request."""

    async def reload(self, reason: str = ...) -> ReloadResult: ...

    def env_names(self) -> list[str]: ...


def build_rest_app(
    engine: Engine, status: Callable[[], Awaitable[DaemonStatus]], config: ConfigControl | None = None
) -> FastAPI:
    """The REST API for one running engine, to be mounted at /api/v1 behind the caller's authentication.

    `status` describes the daemon serving it (port, pid, uptime), which only the daemon knows;
    `config`, its configuration (the reload routes exist only where it is given).
    """
    app = FastAPI(
        title="sidequest",
        version=__version__,
        description="Durable background agent tasks: the MCP tools of sidequest as a REST API.",
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
        servers=[{"url": PREFIX}],
        root_path_in_servers=False,
        responses=_ERROR_RESPONSES,
        generate_unique_id_function=lambda route: route.name,
    )
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(EngineError, _on_engine_error)
    app.add_exception_handler(StoreUnavailable, _on_store_unavailable)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(OverflowError, _on_overflow)
    app.add_middleware(_InternalErrors)

    app.state.engine = engine
    app.state.event_streams = streams = _OpenStreams()
    describe_daemon = status  # `status` is also a query parameter below

    @app.post(
        "/tasks",
        status_code=201,
        response_model=TaskSubmitted,
        responses={
            200: {
                "model": TaskSubmitted,
                "description": "idempotency_key matched an earlier task (unfinished, or finished "
                "within idempotency_window)",
            }
        },
        summary="Start a background task",
        description="As the task_async tool. 201 with the new task, or 200 with the earlier task "
        "that has the same options.idempotency_key (unfinished, or finished within idempotency_window). "
        "options.scope defaults to the caller's project and may only narrow inside it.",
    )
    async def create_task(
        body: TaskCreate, response: Response, scope: CallerScope, project: CallerProject
    ) -> TaskSubmitted:
        submitted = await engine.submit(
            body.agent_definition, body.prompt, TaskOptions.scoped(body.options, scope), project=project
        )
        if submitted.deduplicated:
            response.status_code = 200
        return submitted

    @app.get("/tasks/{task_id}", response_model=TaskInfo, summary="One task, with its attempt history")
    async def get_task(task_id: TaskId) -> TaskInfo:
        return await engine.get_task(task_id, prompt=True)

    @app.get(
        "/tasks/{task_id}/result",
        response_model=ResultPage,
        summary="A page of a task's output",
        description="content holds up to max_chars characters from offset; follow next_offset. "
        "409 not_finished while the task is queued, running or retrying.",
    )
    async def get_result(
        task_id: TaskId,
        offset: Offset = 0,
        max_chars: Annotated[int, Query(ge=1, le=50_000)] = 20_000,
    ) -> ResultPage:
        return await engine.get_result(task_id, offset=offset, max_chars=max_chars)

    @app.get(
        "/tasks/{task_id}/events",
        response_model=TaskLogPage,
        summary="A page of a task's run log",
        description="Oldest first: attempts, progress, agent turns, tool calls with their input, web "
        "search URLs, stderr lines, retries with their reason. Follow next_offset; to follow a running "
        "task live, listen to /events?task_id=… for `task_log` events.",
    )
    async def get_task_log(
        task_id: TaskId,
        offset: Offset = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> TaskLogPage:
        return await engine.get_task_log(task_id, offset=offset, limit=limit)

    @app.post("/tasks/{task_id}/cancel", response_model=CancelResult, summary="Cancel a task")
    async def cancel_task(task_id: TaskId) -> CancelResult:
        return await engine.cancel(task_id=task_id)

    @app.post(
        "/tasks/{task_id}/retry",
        response_model=TaskInfo,
        summary="Queue a failed or cancelled task again",
        description="As the retry_task tool: the same task, its history kept, a fresh set of retries; "
        "its workflow runs again. 400 for a queued, running or completed task.",
    )
    async def retry_task(task_id: TaskId) -> TaskInfo:
        return await engine.retry(task_id)

    @app.post(
        "/wait",
        response_model=WaitResult,
        summary="Wait until tasks finish or a timeout passes",
        description="As the wait_for_tasks tool: returns as soon as any (mode=any) or all (mode=all) "
        "of task_ids, or of workflow_id's tasks, are completed, failed or cancelled, or after timeout "
        "seconds (at most 50), with each task's status.",
    )
    async def wait_for_tasks(body: WaitRequest) -> WaitResult:
        return await engine.wait_for_tasks(body.task_ids, body.workflow_id, body.mode, body.timeout)

    @app.get("/workflows", response_model=WorkflowPage, summary="Workflows with unfinished tasks")
    async def list_workflows(
        scope: CallerScope,
        all_scopes: AllScopes = False,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Offset = 0,
    ) -> WorkflowPage:
        return await engine.list_active_workflows(
            scope=scope, all_scopes=all_scopes, limit=limit, offset=offset
        )

    @app.get("/workflows/{workflow_id}", response_model=WorkflowInfo, summary="A workflow and its tasks")
    async def get_workflow(workflow_id: WorkflowId) -> WorkflowInfo:
        return await engine.get_workflow(workflow_id)

    @app.post(
        "/workflows/{workflow_id}/cancel",
        response_model=CancelResult,
        summary="Cancel every unfinished task of a workflow",
    )
    async def cancel_workflow(workflow_id: WorkflowId) -> CancelResult:
        return await engine.cancel(workflow_id=workflow_id)

    @app.get(
        "/history",
        response_model=WorkflowPage,
        summary="Finished workflows, newest first",
        description="since/until filter by creation time (ISO 8601; UTC when no zone is given).",
    )
    async def workflow_history(
        scope: CallerScope,
        status: Annotated[list[WorkflowStatus] | None, Query()] = None,
        agent: Annotated[str | None, Query()] = None,
        since: Annotated[UtcDatetime | None, Query()] = None,
        until: Annotated[UtcDatetime | None, Query()] = None,
        all_scopes: AllScopes = False,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Offset = 0,
    ) -> WorkflowPage:
        return await engine.workflow_history(
            scope=scope,
            all_scopes=all_scopes,
            status=status,
            agent=agent,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
        )

    @app.get(
        "/status",
        response_model=StatusReport,
        summary="Status of a task or of a workflow and its tasks",
        description="Give exactly one of task_id and workflow_id.",
    )
    async def get_status(
        task_id: Annotated[str | None, Query()] = None,
        workflow_id: Annotated[str | None, Query()] = None,
    ) -> StatusReport:
        return await engine.status(task_id=task_id, workflow_id=workflow_id)

    @app.get(
        "/notifications",
        response_model=NotificationPage,
        summary="What finished since a cursor",
        description="Oldest first, for one reader (the X-Sidequest-Reader header, default 'rest', in the "
        "caller's project): what other readers had does not count. Unlike the MCP tool, reading does "
        "not mark events delivered unless mark_delivered=true; acknowledge handled ones with POST "
        "/notifications/ack. With since, everything after that cursor is returned, delivered or not, "
        "so a read whose reply was lost can be repeated.",
    )
    async def get_notifications(
        scope: CallerScope,
        reader: Reader = DEFAULT_READER,
        since: Annotated[
            int | None, Query(ge=0, le=MAX_OFFSET, description="next_cursor of the previous call")
        ] = None,
        workflow_id: Annotated[str | None, Query()] = None,
        include_delivered: bool = False,
        all_scopes: AllScopes = False,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        mark_delivered: bool = False,
    ) -> NotificationPage:
        return await engine.notifications(
            scope=scope,
            all_scopes=all_scopes,
            since=since,
            workflow_id=workflow_id,
            mark_delivered=mark_delivered,
            include_delivered=include_delivered,
            limit=limit,
            reader=reader,
        )

    @app.post(
        "/notifications/ack",
        response_model=AckResult,
        summary="Mark notifications delivered by cursor",
        description="For this reader only (X-Sidequest-Reader, default 'rest', in the caller's project); "
        "durable when answered.",
    )
    async def ack_notifications(
        body: AckRequest, scope: CallerScope, reader: Reader = DEFAULT_READER
    ) -> AckResult:
        return AckResult(acknowledged=await engine.acknowledge(body.cursors, scope, reader=reader))

    @app.post(
        "/schedules",
        status_code=201,
        response_model=ScheduleCreated,
        summary="Run an agent on a cron schedule",
        description="As the schedule_task tool: every fire time starts a task (in a workflow of its own) "
        "with these options. cron has 5 fields (minute hour day-of-month month day-of-week), or 6 with "
        "seconds first when the server's config allows it; fire times follow `timezone`, DST included. "
        "options.scope defaults to the caller's project. The answer lists the next five fire times (UTC).",
    )
    async def create_schedule(
        body: ScheduleSpec, scope: CallerScope, project: CallerProject
    ) -> ScheduleCreated:
        return await engine.schedule_task(body, scope=scope, project=project)

    @app.get("/schedules", response_model=SchedulePage, summary="Schedules, active, paused and finished")
    async def list_schedules(
        scope: CallerScope,
        all_scopes: AllScopes = False,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Offset = 0,
    ) -> SchedulePage:
        return await engine.list_schedules(scope=scope, all_scopes=all_scopes, limit=limit, offset=offset)

    @app.get("/schedules/{schedule_id}", response_model=ScheduleInfo, summary="One schedule")
    async def get_schedule(schedule_id: ScheduleId) -> ScheduleInfo:
        return await engine.get_schedule(schedule_id)

    @app.patch(
        "/schedules/{schedule_id}",
        response_model=ScheduleInfo,
        summary="Change, pause or resume a schedule",
        description='Only the fields present in the body change: {"paused": true} pauses, '
        '{"paused": false} resumes (from the next fire time after now; missed ones are not caught up). '
        "start_at, end_at and max_runs may be null to remove the limit. Giving a finished schedule more "
        "room (end_at, max_runs) or resuming it makes it run again.",
    )
    async def update_schedule(
        schedule_id: ScheduleId, body: ScheduleUpdate, project: CallerProject
    ) -> ScheduleInfo:
        return await engine.update_schedule(schedule_id, body, project=project)

    @app.delete(
        "/schedules/{schedule_id}",
        response_model=ScheduleDeleted,
        summary="Delete a schedule",
        description="No further runs start; runs already started go on, and keep their schedule_id.",
    )
    async def delete_schedule(schedule_id: ScheduleId) -> ScheduleDeleted:
        return await engine.delete_schedule(schedule_id)

    @app.get(
        "/schedules/{schedule_id}/runs",
        response_model=ScheduleRuns,
        summary="A schedule's runs: the tasks it started, newest first",
    )
    async def schedule_runs(
        schedule_id: ScheduleId,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Offset = 0,
    ) -> ScheduleRuns:
        return await engine.schedule_runs(schedule_id, limit=limit, offset=offset)

    @app.get("/agents", response_model=AgentList, summary="Agents the caller's project may launch")
    async def list_agents(scope: CallerScope, project: CallerProject) -> AgentList:
        return await engine.agent_list(scope, project)

    @app.get(
        "/workers",
        response_model=WorkerList,
        summary="The processes that run attempts",
        description="Every worker the store knows, alive or recently gone: the daemon (when it runs "
        "work) and each `sidequest worker` on a shared PostgreSQL store, with its queues, concurrency, "
        "running attempts and last heartbeat. On DuckDB the daemon is the one worker.",
    )
    async def list_workers() -> WorkerList:
        return await engine.list_workers()

    @app.get("/daemon", response_model=DaemonStatus, summary="The serving daemon and what it holds")
    async def daemon_status() -> DaemonStatus:
        return await describe_daemon()

    def control() -> ConfigControl:
        if config is None:
            raise InvalidRequest("this server reads its configuration once; reloading is the daemon's")
        return config

    @app.post(
        "/reload",
        response_model=ReloadResult,
        summary="Read the config file and env files again",
        description="Applies what can change while the daemon serves (agents, limits, retention, "
        "schedules settings, the daemon's variables for new attempts) and names the settings that "
        "need a restart (http.host, http.port, database, lease_seconds, workers.queues, "
        "workers.heartbeat_seconds). A file that fails to parse or validate is not applied: the old "
        "configuration keeps serving, and `problem` (also in GET /daemon) says why.",
    )
    async def reload_config() -> ReloadResult:
        return await control().reload("asked over REST")

    @app.get(
        "/daemon/environment",
        response_model=EnvNames,
        summary="Names of the daemon's environment variables (never values)",
    )
    async def daemon_environment() -> EnvNames:
        return EnvNames(names=control().env_names())

    @app.post(
        "/gc",
        response_model=GcReport,
        summary="Delete finished tasks older than an age",
        description="Deletes tasks that completed, failed or were cancelled longer ago than older_than "
        "(default: the daemon's retention setting), with their attempts, results, usage, notifications, "
        "webhook deliveries and schedule fire keys, and workflows none of whose tasks remain; unfinished "
        "tasks and schedules stay. Then checkpoints the database so the space is reused. dry_run counts "
        "without deleting. Every scope: the token holder owns the whole store. Safe to repeat. "
        "The daemon also does this by itself (at start, then periodically) unless retention is off.",
    )
    async def gc(body: Annotated[GcRequest | None, Body()] = None) -> GcReport:
        body = body or GcRequest()
        return await engine.gc(body.older_than, dry_run=body.dry_run)

    @app.get(
        "/events",
        response_class=EventSourceResponse,
        summary="Server-sent events on every change",
        description=EVENTS_DESCRIPTION,
        responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
    )
    async def stream_events(
        task_id: Annotated[
            str | None, Query(max_length=200, description="also send this task's run-log entries (task_log)")
        ] = None,
    ) -> EventSourceResponse:
        return _EventStream(engine, streams, task_id).response()

    return app


def close_event_streams(app: FastAPI) -> None:
    """End every open `/events` stream, and any opened from now on, after what each has queued.

    Call it on the event loop as the server starts to shut down, before uvicorn's
    `should_exit`: uvicorn waits for open responses (up to timeout_graceful_shutdown,
    then cuts them off), and sse-starlette only notices a shutdown through uvicorn's
    own signal handler, which a server handling signals itself does not install.
    """
    streams: _OpenStreams = app.state.event_streams
    streams.close()


def rest_mount(app: ASGIApp) -> Mount:
    """`Mount(PREFIX, app)` that also routes paths holding a newline (a task id is any string).

    Starlette's mount pattern ends at a newline, so such a request would fall
    out of the API to the outer app's plain-text 404.
    """
    mount = Mount(PREFIX, app=app)
    mount.path_regex = re.compile(mount.path_regex.pattern, re.DOTALL)
    return mount
