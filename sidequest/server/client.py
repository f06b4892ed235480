"""A client of the daemon's REST API with the engine's method names, so MCP tools and the CLI run
unchanged against a daemon in another process.

Why the same names: the stdio front registers the very tools the daemon's own MCP endpoint has
(`server/mcp.py`); only the object behind them differs. Errors come back as the engine's own
exception types, so a model reads the same message whichever way it connected.

The daemon may die between two calls (kill -9, a crash, `sidequest stop`). A call that cannot
reach it asks the locator for a live daemon (which starts one, unless a watcher cleared
`may_start`) and is sent once more. Every call
is safe to send twice: reads are reads, cancel is idempotent, and `submit` always carries an
idempotency key (one is made here when the caller gave none), so a retry returns the task the
first attempt created instead of a second one.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import quote

import anyio
import httpx2
from pydantic import BaseModel, ValidationError

from sidequest.engine.errors import EngineError, InvalidRequest, NotFound, QueueFull, Unavailable
from sidequest.engine.notifier import DEFAULT_READER
from sidequest.models import (
    AckRequest,
    AckResult,
    AgentList,
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
    TaskLogPage,
    TaskOptions,
    TaskSubmitted,
    WaitMode,
    WaitRequest,
    WaitResult,
    WorkerList,
    WorkflowInfo,
    WorkflowPage,
    WorkflowStatus,
)
from sidequest.storage.base import Committed

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

API = "/api/v1"
PROJECT_HEADER = "X-Sidequest-Project"
READER_HEADER = "X-Sidequest-Reader"
IDEMPOTENCY_PREFIX = "front-"
"""Keys the client makes up for retries; a caller's own key is passed through untouched."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a live daemon listens and how to prove we may talk to it."""

    url: str
    token: str
    version: str
    pid: int


Locate = Callable[[bool], Awaitable[Endpoint]]
"""`locate(start)`: the live daemon; with start=True one is started when none answers.
Raises `Unavailable` when there is none (start=False) or it cannot be started."""

_GONE = (httpx2.ConnectError, httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError)
"""The daemon is not there, or went away mid-request: find (or start) it and send again."""


def _error(status: int, body: bytes) -> EngineError:
    try:
        data = json.loads(body)
        code, message = str(data["code"]), str(data["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "internal", body.decode("utf-8", "replace")[:500] or f"HTTP {status}"
    if status == 404 or code == "not_found":
        return NotFound(message)
    if status in (400, 409, 422):
        error = InvalidRequest(message)
        error.code = code
        return error
    if status == 429 or code == "queue_full":
        return QueueFull(message)
    if status == 503 or code in ("unavailable", "store_unavailable"):
        return Unavailable(message)
    return EngineError(f"the sidequest daemon failed ({code}, HTTP {status}): {message}")


def _query(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Drop unset values; lists repeat the key; booleans and times as the API reads them."""
    items: list[tuple[str, str]] = []
    for key, value in params.items():
        for item in value if isinstance(value, list) else [value]:
            if item is None:
                continue
            if isinstance(item, bool):
                items.append((key, "true" if item else "false"))
            elif isinstance(item, datetime):
                items.append((key, item.isoformat()))
            else:
                items.append((key, str(item)))
    return items


class DaemonClient:
    """The engine's API, spoken over HTTP to the daemon. One per process; reuses connections."""

    def __init__(self, locate: Locate, project: str, *, timeout: float = 60.0) -> None:
        self.project = project
        self._locate = locate
        self._endpoint: Endpoint | None = None
        # trust_env=False: a proxy from the environment would see the bearer token.
        self._http = httpx2.AsyncClient(timeout=httpx2.Timeout(timeout, connect=5.0), trust_env=False)
        self._listeners: list[Callable[[Committed], None]] = []
        self._relocating = anyio.Lock()
        self.may_start = True
        """Whether a call that finds no daemon starts one. A watcher (`submit --wait`, `tasks --watch`)
        clears it once connected: it follows a daemon, and must not bring back one the user stopped."""

    async def __aenter__(self) -> DaemonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def endpoint(self) -> Endpoint | None:
        return self._endpoint

    async def connect(self) -> Endpoint:
        """Find the daemon (starting one if needed, and if `may_start`) before the first call."""
        if self._endpoint is None:
            self._endpoint = await self._locate(self.may_start)
        return self._endpoint

    async def _relocate(self, failed: Endpoint | None) -> Endpoint:
        async with self._relocating:  # concurrent failures start one daemon, not several
            if self._endpoint is not None and self._endpoint != failed:
                return self._endpoint  # someone else already found the new one
            self._endpoint = None
            self._endpoint = await self._locate(self.may_start)
            return self._endpoint

    def _headers(self, endpoint: Endpoint) -> dict[str, str]:
        """The header names *our* project, never a scope from a call's arguments: the daemon trusts
        it as a working directory, and a model types those arguments (`options.scope` travels in
        the body, untrusted). Percent-encoded: header values are ASCII, paths need not be."""
        return {"Authorization": f"Bearer {endpoint.token}", PROJECT_HEADER: quote(self.project, safe="/")}

    async def _call(
        self,
        method: str,
        path: str,
        model: type[M],
        *,
        params: Mapping[str, Any] | None = None,
        body: BaseModel | None = None,
        exclude_unset: bool = False,
        timeout: httpx2.Timeout | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> M:
        """`exclude_unset` sends only the fields the caller set, nulls included: a PATCH body, where an
        explicit null (end_at: null, "no end") means something different from leaving a field out.
        `timeout` replaces the client's own for calls that may rightly take long."""
        endpoint = await self.connect()
        content = None
        if body is not None:
            dumped = (
                body.model_dump_json(exclude_unset=True)
                if exclude_unset
                else body.model_dump_json(exclude_none=True)
            )
            content = dumped.encode()
        headers = {**(headers or {}), **self._headers(endpoint)}
        if content is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            try:
                response = await self._http.request(
                    method,
                    endpoint.url + API + path,
                    params=_query(params or {}),
                    content=content,
                    headers=headers,
                    **({"timeout": timeout} if timeout is not None else {}),
                )
            except _GONE as exc:
                if attempt == 2:
                    raise Unavailable(f"the sidequest daemon stopped answering ({exc!r})") from exc
                log.warning(
                    "the sidequest daemon at %s is gone (%s); finding or starting one", endpoint.url, exc
                )
                endpoint = await self._relocate(endpoint)
                headers = {**headers, **self._headers(endpoint)}
                continue
            except httpx2.TimeoutException as exc:
                raise Unavailable(
                    f"the sidequest daemon did not answer in time ({type(exc).__name__}); it may be "
                    "overloaded. The request may have been applied: check before repeating a submit."
                ) from exc
            if response.status_code == 401 and attempt == 1:
                endpoint = await self._relocate(endpoint)  # a new daemon with a new token took over
                headers = {**headers, **self._headers(endpoint)}
                continue
            if response.status_code >= 400:
                raise _error(response.status_code, response.content)
            try:
                return model.model_validate_json(response.content)
            except ValidationError as exc:
                raise EngineError(
                    f"the sidequest daemon sent a reply this client cannot read ({exc.error_count()} "
                    "problems); are the daemon and this command the same version? `sidequest status`"
                ) from exc
        raise AssertionError("unreachable")

    # ---- the engine's API ---------------------------------------------------
    # `scope` arguments are accepted to match the engine, and not sent: the daemon scopes every
    # request by the project header, and a model-typed `options.scope` travels in the body.

    async def submit(
        self, agent: str, prompt: str, options: TaskOptions | None = None, *, project: str | None = None
    ) -> TaskSubmitted:
        """`project` is not sent in the body: the daemon takes it from our header (we hold its token)."""
        options = options or TaskOptions()
        if not options.idempotency_key:
            key = IDEMPOTENCY_PREFIX + secrets.token_urlsafe(16)
            options = options.model_copy(update={"idempotency_key": key})
        body = TaskCreate(agent_definition=agent, prompt=prompt, options=options)
        submitted = await self._call("POST", "/tasks", TaskSubmitted, body=body)
        if submitted.deduplicated and options.idempotency_key.startswith(IDEMPOTENCY_PREFIX):
            # Our own retry found the task the first attempt made: to the caller it is new.
            submitted = submitted.model_copy(update={"deduplicated": False})
        return submitted

    async def status(self, task_id: str | None = None, workflow_id: str | None = None) -> StatusReport:
        return await self._call(
            "GET", "/status", StatusReport, params={"task_id": task_id, "workflow_id": workflow_id}
        )

    async def get_task(self, task_id: str) -> TaskInfo:
        return await self._call("GET", f"/tasks/{_segment(task_id)}", TaskInfo)

    async def get_workflow(self, workflow_id: str) -> WorkflowInfo:
        return await self._call("GET", f"/workflows/{_segment(workflow_id)}", WorkflowInfo)

    async def get_result(self, task_id: str, offset: int = 0, max_chars: int = 20_000) -> ResultPage:
        return await self._call(
            "GET",
            f"/tasks/{_segment(task_id)}/result",
            ResultPage,
            params={"offset": offset, "max_chars": max_chars},
        )

    async def get_task_log(self, task_id: str, offset: int = 0, limit: int = 100) -> TaskLogPage:
        return await self._call(
            "GET",
            f"/tasks/{_segment(task_id)}/events",
            TaskLogPage,
            params={"offset": offset, "limit": limit},
        )

    async def cancel(self, task_id: str | None = None, workflow_id: str | None = None) -> CancelResult:
        if (task_id is None) == (workflow_id is None):
            raise InvalidRequest("give exactly one of task_id or workflow_id")
        if task_id is not None:
            return await self._call("POST", f"/tasks/{_segment(task_id)}/cancel", CancelResult)
        return await self._call("POST", f"/workflows/{_segment(workflow_id or '')}/cancel", CancelResult)

    async def retry(self, task_id: str) -> TaskInfo:
        return await self._call("POST", f"/tasks/{_segment(task_id)}/retry", TaskInfo)

    async def wait_for_tasks(
        self,
        task_ids: list[str] | None = None,
        workflow_id: str | None = None,
        mode: WaitMode = "any",
        timeout: float = 30.0,
    ) -> WaitResult:
        """The read timeout outlasts the wait, so a long wait is not mistaken for a dead daemon."""
        body = WaitRequest(task_ids=task_ids, workflow_id=workflow_id, mode=mode, timeout=timeout)
        read = httpx2.Timeout(body.timeout + 15.0, connect=5.0)
        return await self._call("POST", "/wait", WaitResult, body=body, timeout=read)

    async def list_active_workflows(
        self, scope: str | None = None, all_scopes: bool = False, limit: int = 20, offset: int = 0
    ) -> WorkflowPage:
        return await self._call(
            "GET",
            "/workflows",
            WorkflowPage,
            params={"all_scopes": all_scopes, "limit": limit, "offset": offset},
        )

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
    ) -> WorkflowPage:
        params = {
            "all_scopes": all_scopes,
            "status": [s.value for s in status or []],
            "agent": agent,
            "since": since,
            "until": until,
            "limit": limit,
            "offset": offset,
        }
        return await self._call("GET", "/history", WorkflowPage, params=params)

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
        reader: str = DEFAULT_READER,
    ) -> NotificationPage:
        """`reader` travels as a header, like the project: who reads is the caller's surface, not
        an argument of the call."""
        params = {
            "all_scopes": all_scopes,
            "since": since,
            "workflow_id": workflow_id,
            "mark_delivered": mark_delivered,
            "include_delivered": include_delivered,
            "limit": limit,
        }
        return await self._call(
            "GET", "/notifications", NotificationPage, params=params, headers={READER_HEADER: reader}
        )

    async def acknowledge(self, cursors: list[int], *, reader: str = DEFAULT_READER) -> int:
        result = await self._call(
            "POST",
            "/notifications/ack",
            AckResult,
            body=AckRequest(cursors=cursors),
            headers={READER_HEADER: reader},
        )
        return result.acknowledged

    async def schedule_task(
        self, spec: ScheduleSpec, scope: str | None = None, *, project: str | None = None
    ) -> ScheduleCreated:
        """Sent again if the daemon goes away mid-request, as every call is; unlike `submit` there is no
        idempotency key, so a create whose answer was lost can leave a duplicate (listed; rare)."""
        return await self._call("POST", "/schedules", ScheduleCreated, body=spec)

    async def list_schedules(
        self, scope: str | None = None, all_scopes: bool = False, limit: int = 20, offset: int = 0
    ) -> SchedulePage:
        return await self._call(
            "GET",
            "/schedules",
            SchedulePage,
            params={"all_scopes": all_scopes, "limit": limit, "offset": offset},
        )

    async def get_schedule(self, schedule_id: str) -> ScheduleInfo:
        return await self._call("GET", f"/schedules/{_segment(schedule_id)}", ScheduleInfo)

    async def update_schedule(
        self, schedule_id: str, change: ScheduleUpdate, *, project: str | None = None
    ) -> ScheduleInfo:
        return await self._call(
            "PATCH", f"/schedules/{_segment(schedule_id)}", ScheduleInfo, body=change, exclude_unset=True
        )

    async def delete_schedule(self, schedule_id: str) -> ScheduleDeleted:
        return await self._call("DELETE", f"/schedules/{_segment(schedule_id)}", ScheduleDeleted)

    async def schedule_runs(self, schedule_id: str, limit: int = 20, offset: int = 0) -> ScheduleRuns:
        return await self._call(
            "GET",
            f"/schedules/{_segment(schedule_id)}/runs",
            ScheduleRuns,
            params={"limit": limit, "offset": offset},
        )

    async def agent_list(self, scope: str | None = None, project: str | None = None) -> AgentList:
        return await self._call("GET", "/agents", AgentList)

    async def daemon_status(self) -> DaemonStatus:
        return await self._call("GET", "/daemon", DaemonStatus)

    async def list_workers(self) -> WorkerList:
        return await self._call("GET", "/workers", WorkerList)

    async def reload_config(self) -> ReloadResult:
        return await self._call("POST", "/reload", ReloadResult)

    async def environment_names(self) -> EnvNames:
        return await self._call("GET", "/daemon/environment", EnvNames)

    async def gc(self, older_than: float | None = None, dry_run: bool = False) -> GcReport:
        """No read timeout: a first purge of a large store takes a while (in short transactions, so
        the daemon keeps serving). Sent again after a lost daemon like every call, which is safe:
        a second purge deletes what the first did not get to."""
        body = GcRequest(older_than=older_than, dry_run=dry_run)
        return await self._call("POST", "/gc", GcReport, body=body, timeout=httpx2.Timeout(None, connect=5.0))

    # ---- push -----------------------------------------------------------------

    def add_listener(self, listener: Callable[[Committed], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def relay_events(self, *, retry_delay: float = 0.5) -> None:
        """Turn the daemon's event stream into listener calls, for as long as we run.

        A lost stream is reopened against whatever daemon is live then; this loop never starts
        one itself (a deliberate `sidequest stop` stays stopped until the next tool call).
        Changes made while no stream was open are not pushed; reads still show them.
        """
        delay = retry_delay
        while True:
            try:
                endpoint = self._endpoint or await self._locate(False)
                self._endpoint = self._endpoint or endpoint
                async for kind, data in self._events(endpoint):
                    delay = retry_delay
                    if kind == "update":
                        self._dispatch(data)
            except Exception as exc:  # whatever went wrong, the front must outlive its event stream
                log.debug("event stream closed: %r", exc)
                if self._endpoint is not None and not await _answers(self._http, self._endpoint):
                    self._endpoint = None  # gone: the next call (or this loop) looks it up again
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The daemon's event stream as (kind, data) pairs, for a watcher that re-reads on each.

        Unlike `relay_events` it ends when the stream does (the caller decides whether to reopen).
        Like it, it never starts a daemon, and when the stream ends or fails it checks that the
        daemon still answers: if not, the endpoint is forgotten, so the next call or stream looks
        the daemon up again (a restarted one has a new port and token) instead of using a dead one."""
        endpoint = self._endpoint or await self._locate(False)
        self._endpoint = self._endpoint or endpoint
        try:
            async for item in self._events(endpoint):
                yield item
        except Exception:
            await self._forget_if_gone(endpoint)
            raise
        await self._forget_if_gone(endpoint)

    async def _forget_if_gone(self, endpoint: Endpoint) -> None:
        if self._endpoint == endpoint and not await _answers(self._http, endpoint):
            self._endpoint = None

    async def _events(self, endpoint: Endpoint) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        headers = self._headers(endpoint)
        timeout = httpx2.Timeout(None, connect=5.0)  # the stream idles between changes; pings keep it open
        async with self._http.stream(
            "GET", endpoint.url + API + "/events", headers=headers, timeout=timeout
        ) as response:
            if response.status_code != 200:
                raise _error(response.status_code, await response.aread())
            kind, data = "message", ""
            async for line in response.aiter_lines():
                if not line:
                    if data:
                        yield kind, json.loads(data)
                    kind, data = "message", ""
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()

    def _dispatch(self, data: dict[str, Any]) -> None:
        committed = Committed(
            task_ids=set(data.get("task_ids") or []), workflow_ids=set(data.get("workflow_ids") or [])
        )
        for listener in list(self._listeners):
            try:
                listener(committed)
            except Exception:
                log.exception("event listener failed")


async def _answers(http: httpx2.AsyncClient, endpoint: Endpoint) -> bool:
    """The daemon we knew still answers there (not another process that took its port)."""
    try:
        response = await http.get(endpoint.url + "/health", timeout=2.0)
        return response.status_code == 200 and response.json().get("pid") == endpoint.pid
    except (httpx2.HTTPError, ValueError, AttributeError):
        return False


_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")


def _segment(value: str) -> str:
    """Ids are url-safe by construction; anything else (a model-typed "t_1/cancel") is no id of
    ours, and must not become a path to another route."""
    if not _ID.fullmatch(value):
        raise NotFound(f"unknown id {value[:100]!r}: ids look like 't_…', 'wf_…' or 'sch_…'")
    return value


async def iterate_pages(fetch: Callable[[int], Awaitable[WorkflowPage]]) -> AsyncIterator[WorkflowInfo]:
    """Every workflow across pages, for CLI listings."""
    offset: int | None = 0
    while offset is not None:
        page = await fetch(offset)
        for workflow in page.workflows:
            yield workflow
        offset = page.next_offset
