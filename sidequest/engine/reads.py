"""Reads: tasks, workflows, statuses, lists, history, results, run logs and notifications,
as the surfaces show them, with the one-line hints that tell a model what to do next.

Every read first waits for the writes already enqueued (read-your-writes), then goes to the
store; only task statuses are answered from the live tasks, which are ahead of the store.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import datetime
from typing import cast

from sidequest.engine.admission import default_scope
from sidequest.engine.errors import InvalidRequest, NotFinished, NotFound
from sidequest.engine.notifier import DEFAULT_READER, Notifier, reader_key
from sidequest.engine.text import duration, short
from sidequest.models import (
    Attempt,
    Notification,
    NotificationKind,
    NotificationPage,
    Progress,
    ResultPage,
    Source,
    StatusReport,
    TaskInfo,
    TaskLogEvent,
    TaskLogPage,
    TaskStatus,
    Usage,
    WorkflowInfo,
    WorkflowPage,
    WorkflowStatus,
    as_utc,
    utcnow,
)
from sidequest.storage.base import SharedStore, Store, TaskRecord, WorkflowQuery, WorkflowRecord

PROMPT_PREVIEW_CHARS = 160
"""Enough to tell tasks apart in a status or a list; the whole prompt is on REST and `sidequest show`."""

MAX_LOG_PAGE = 1000
"""Most run-log entries one read returns."""
LOG_PAGE_CHARS = 40_000
"""A page of the run log stops once its entries hold this much text (the first entry always comes):
a model reads a page whole, and 100 entries of tool input could be most of a megabyte."""
MAX_OFFSET = 2**31 - 1
"""Offsets and cursors beyond this are typos (and overflow the store's integer types)."""


def check_paging(offset: int, limit: int, max_limit: int, limit_name: str = "limit") -> None:
    if not 0 <= offset <= MAX_OFFSET:
        raise InvalidRequest(f"offset must be between 0 and {MAX_OFFSET}, got {offset}")
    if not 1 <= limit <= max_limit:
        raise InvalidRequest(f"{limit_name} must be between 1 and {max_limit}, got {limit}")


def _preview(prompt: str | None) -> str | None:
    """The prompt's start on one line. Only a bounded head is looked at: prompts may be megabytes,
    and every task of a listing gets one."""
    if not prompt:
        return None
    head = prompt[: PROMPT_PREVIEW_CHARS * 8]
    line = " ".join(head.split())
    if len(line) > PROMPT_PREVIEW_CHARS or (len(head) < len(prompt) and prompt[len(head) :].strip()):
        return line[: PROMPT_PREVIEW_CHARS - 1] + "…"
    return line or None


def _read_sources(stored: object) -> list[Source]:
    """Stored sources, skipping any a reader could not take (rows from before they were checked)."""
    found = []
    for raw in stored if isinstance(stored, list) else ():
        try:
            found.append(Source.model_validate(raw))
        except ValueError:
            continue
    return found


def _not_finished(task: TaskRecord) -> str:
    """Where an unfinished task stands and what to do: an early read must not look like an empty result."""
    where = [f"attempt {task.attempts}"] if task.attempts else []
    if task.progress_percent is not None:
        where.append(f"{task.progress_percent:g}%")
    if task.progress_message:
        where.append(repr(short(task.progress_message, 80)))
    if task.status == TaskStatus.retrying and task.next_attempt_at is not None:
        where.append(f"next attempt at {task.next_attempt_at.isoformat(timespec='seconds')}")
    detail = f" ({', '.join(where)})" if where else ""
    return (
        f"task {task.id} is {task.status}{detail} and has no result until it finishes; call "
        f"wait_for_tasks(task_ids=[{task.id!r}]) to wait for it, or read get_workflow_notifications later"
    )


def _check_again(elapsed: float) -> str:
    """Young work is checked sooner; the model should not spend turns polling long work."""
    return (
        "in about 30 seconds"
        if elapsed < 60
        else "in about a minute"
        if elapsed < 600
        else "in a few minutes"
    )


def _task_hint(task: TaskInfo, elapsed: float, now: datetime) -> str:
    """What a model should do next with this task, in one line (it has no clock of its own)."""
    took = duration(elapsed)
    wait = f"check again {_check_again(elapsed)}, or call wait_for_tasks"
    match task.status:
        case TaskStatus.completed:
            return f"completed in {took}; read the output with get_task_result"
        case TaskStatus.failed:
            tries = f"{task.attempts} attempt{'s' if task.attempts != 1 else ''}"
            return f"failed after {tries} ({took}); see error, then retry_task once the cause is fixed"
        case TaskStatus.cancelled:
            return "cancelled; retry_task runs it again"
        case TaskStatus.retrying:
            due = (
                f" in {duration((task.next_attempt_at - now).total_seconds())}"
                if task.next_attempt_at
                else ""
            )
            return f"attempt {task.attempts} failed; next attempt{due}; {wait}"
        case TaskStatus.running:
            done = (
                f", {task.progress.percent:g}% done"
                if task.progress and task.progress.percent is not None
                else ""
            )
            return f"running for {took} (attempt {task.attempts}{done}); {wait}"
        case _:
            return f"{task.status.value} for {took}, not started yet; {wait}"


def _workflow_hint(workflow: WorkflowInfo, elapsed: float) -> str:
    counts = workflow.counts
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if n) or "no tasks"
    if workflow.status == WorkflowStatus.running:
        finished = sum(n for s, n in counts.items() if TaskStatus(s).finished)
        return (
            f"running for {duration(elapsed)}: {finished} of {sum(counts.values())} tasks finished "
            f"({summary}); check again {_check_again(elapsed)}, or call wait_for_tasks"
        )
    retry = "; retry_task runs a failed or cancelled task again" if workflow.status != "completed" else ""
    took = duration(elapsed)
    return f"{workflow.status.value} in {took} ({summary}); read outputs with get_task_result{retry}"


class Reads:
    """The engine's reads; `live` is the engine's live tasks (read, never changed here)."""

    def __init__(self, store: Store, live: dict[str, TaskRecord], notifier: Notifier) -> None:
        self.store = store
        self._live = live
        self.notifier = notifier

    def task_info(self, task: TaskRecord, result_chars: int | None = None) -> TaskInfo:
        progress = None
        if task.progress_percent is not None or task.progress_message:
            progress = Progress(percent=task.progress_percent, message=task.progress_message)
        options = task.options or {}
        return TaskInfo(
            task_id=task.id,
            workflow_id=task.workflow_id,
            agent=task.agent,
            status=TaskStatus(task.status),
            priority=task.priority,  # type: ignore[arg-type]
            scope=task.scope,
            created_at=task.created_at,
            prompt_preview=_preview(task.prompt),
            started_at=task.started_at,
            finished_at=task.finished_at,
            not_before=task.not_before,
            next_attempt_at=task.next_attempt_at,
            attempts=task.attempts,
            max_retries=task.max_retries,
            timeout=task.timeout_s,
            progress=progress,
            result_preview=task.result_preview,
            result_chars=result_chars,
            error=task.error,
            tags=list(options.get("tags", [])),
            metadata=dict(options.get("metadata", {})),
            session_id=task.session_id,
            schedule_id=task.schedule_id,
        )

    async def get_task(self, task_id: str, history: bool = True, prompt: bool = False) -> TaskInfo:
        """`prompt`: include the whole prompt. Off for model-facing reads, where a preview is enough
        and a long prompt the model wrote itself would be read back on every status check."""
        await self.store.flush()
        task = await self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"unknown task_id {task_id!r}")
        # Each read is a DuckDB statement (~1.5-4 ms): skip the ones that cannot find anything.
        sizes = await self.store.get_result_size([task_id]) if task.status == TaskStatus.completed else {}
        info = self.task_info(task, sizes.get(task_id))
        if prompt:
            info.prompt = task.prompt
        if task.attempts == 0:
            info.attempt_history = [] if history else None
            return info  # never ran: no usage, no attempt rows
        usage = (await self.store.get_usage([task_id])).get(task_id)
        if usage is not None:
            info.usage = Usage(**dataclasses.asdict(usage))
        if history:
            info.attempt_history = [
                Attempt(
                    attempt=a.attempt,
                    status=a.status,
                    started_at=a.started_at,
                    finished_at=a.finished_at,
                    error=a.error,
                )
                for a in await self.store.get_attempts(task_id)
            ]
        return info

    def _workflow_info(
        self, workflow: WorkflowRecord, counts: dict[str, int], tasks: list[TaskInfo] | None = None
    ) -> WorkflowInfo:
        return WorkflowInfo(
            workflow_id=workflow.id,
            name=workflow.name,
            status=WorkflowStatus(workflow.status),
            scope=workflow.scope,
            created_at=workflow.created_at,
            updated_at=workflow.updated_at,
            finished_at=workflow.finished_at,
            counts=counts,
            tasks=tasks,
        )

    async def get_workflow(self, workflow_id: str) -> WorkflowInfo:
        await self.store.flush()
        workflow = await self.store.get_workflow(workflow_id)
        if workflow is None:
            raise NotFound(f"unknown workflow_id {workflow_id!r}")
        tasks = await self.store.get_tasks(workflow_id)
        sizes = await self.store.get_result_size([t.id for t in tasks if t.status == TaskStatus.completed])
        counts = dict(Counter(t.status for t in tasks))
        infos = [self.task_info(t, sizes.get(t.id)) for t in tasks]
        return self._workflow_info(workflow, counts, infos)

    async def status(self, task_id: str | None = None, workflow_id: str | None = None) -> StatusReport:
        if bool(task_id) == bool(workflow_id):
            raise InvalidRequest("give exactly one of task_id or workflow_id")
        now = utcnow()
        if task_id:
            task = await self.get_task(task_id)
            elapsed = ((task.finished_at or now) - task.created_at).total_seconds()
            return StatusReport(
                kind="task", task=task, elapsed_seconds=round(elapsed, 1), hint=_task_hint(task, elapsed, now)
            )
        workflow = await self.get_workflow(workflow_id)  # type: ignore[arg-type]
        elapsed = ((workflow.finished_at or now) - workflow.created_at).total_seconds()
        return StatusReport(
            kind="workflow",
            workflow=workflow,
            elapsed_seconds=round(elapsed, 1),
            hint=_workflow_hint(workflow, elapsed),
        )

    async def workflow_page(self, query: WorkflowQuery) -> WorkflowPage:
        check_paging(query.offset, query.limit, max_limit=200)
        await self.store.flush()
        rows, total = await self.store.list_workflows(query)
        counts = await self.store.workflow_counts([w.id for w in rows])
        infos = [self._workflow_info(w, counts.get(w.id, {})) for w in rows]
        next_offset = query.offset + len(rows) if query.offset + len(rows) < total else None
        return WorkflowPage(workflows=infos, total=total, next_offset=next_offset)

    async def list_active_workflows(
        self, scope: str | None = None, all_scopes: bool = False, limit: int = 20, offset: int = 0
    ) -> WorkflowPage:
        query = WorkflowQuery(
            scope=None if all_scopes else (scope or default_scope()),
            finished=False,
            limit=limit,
            offset=offset,
        )
        return await self.workflow_page(query)

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
        statuses = [s.value for s in status or []]
        if WorkflowStatus.running.value in statuses:
            raise InvalidRequest(
                "history lists finished workflows; use list_active_workflows for running ones"
            )
        query = WorkflowQuery(
            scope=None if all_scopes else (scope or default_scope()),
            finished=True,
            statuses=statuses,
            agent=agent,
            since=as_utc(since) if since else None,
            until=as_utc(until) if until else None,
            limit=limit,
            offset=offset,
        )
        return await self.workflow_page(query)

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
        """What `reader` (in the caller's project) has not had yet; other readers' reads change
        nothing here. `since` reads everything after that cursor, delivered or not, so a read
        whose reply was lost is repeated by sending the same `since` again."""
        if since is not None and not 0 <= since <= MAX_OFFSET:
            raise InvalidRequest(f"since must be a cursor between 0 and {MAX_OFFSET}, got {since}")
        check_paging(0, limit, max_limit=1000)
        own = scope or default_scope()
        key = reader_key(reader, own)
        await self.store.flush()
        rows = await self.store.list_notifications(
            None if all_scopes else own,
            since or 0,
            workflow_id,
            include_delivered or since is not None,
            limit,
            key,
        )
        if mark_delivered:
            self.store.mark_delivered(key, [r.cursor for r in rows if r.delivered_at is None], utcnow())
        items = [
            Notification(
                cursor=r.cursor,
                kind=NotificationKind(r.kind),
                task_id=r.task_id,
                workflow_id=r.workflow_id,
                scope=r.scope,
                message=r.message,
                created_at=r.created_at,
                delivered=r.delivered_at is not None,
            )
            for r in rows
        ]
        next_cursor = rows[-1].cursor if rows else (since or 0)
        return NotificationPage(notifications=items, next_cursor=next_cursor)

    # ---- schedules -------------------------------------------------------

    async def task_statuses(self, task_ids: list[str]) -> dict[str, str]:
        """Live tasks from memory (ahead of the store), the rest in one statement."""
        found = {t: self._live[t].status for t in task_ids if t in self._live}
        rest = [t for t in task_ids if t not in found]
        if rest:
            await self.store.flush()
            found.update(await self.store.task_statuses(rest))
        return found

    async def acknowledge(
        self, cursors: list[int], scope: str | None = None, *, reader: str = DEFAULT_READER
    ) -> int:
        """Mark notifications delivered to this reader only (REST readers read first, then
        acknowledge what they handled). Durable before it returns: an acknowledged read is not
        handed out again after a crash."""
        if not cursors:
            raise InvalidRequest("cursors must name at least one notification cursor")
        if any(not 1 <= c <= MAX_OFFSET for c in cursors):
            raise InvalidRequest(f"cursors must be between 1 and {MAX_OFFSET}")
        key = reader_key(reader, scope or default_scope())
        # On a shared store the database issues cursors (other processes' too), not the notifier.
        last = self.notifier.last_cursor
        if self.store.shared:
            last = await cast(SharedStore, self.store).max_cursor()
        known = sorted({c for c in cursors if c <= last})
        self.store.mark_delivered(key, known, utcnow())
        await self.store.flush()
        return len(known)

    async def task_counts(self) -> dict[str, int]:
        """Tasks by status across every scope, for `sidequest status`."""
        await self.store.flush()
        return await self.store.task_counts()

    async def get_result(self, task_id: str, offset: int = 0, max_chars: int = 20_000) -> ResultPage:
        check_paging(offset, max_chars, max_limit=1_000_000, limit_name="max_chars")
        await self.store.flush()
        task = await self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"unknown task_id {task_id!r}")
        if not TaskStatus(task.status).finished:
            raise NotFinished(_not_finished(task))
        page = await self.store.get_result_page(task_id, offset, max_chars)
        if page is None:
            return ResultPage(
                task_id=task_id,
                status=TaskStatus(task.status),
                offset=offset,
                total_chars=0,
                content="",
                error=task.error,
            )
        content_type, content, total, sources = page
        if offset > total:
            raise InvalidRequest(f"offset {offset} is past the end of the result ({total} characters)")
        end = offset + len(content)
        return ResultPage(
            task_id=task_id,
            status=TaskStatus(task.status),
            content_type=content_type,  # type: ignore[arg-type]
            offset=offset,
            total_chars=total,
            content=content,
            next_offset=end if end < total else None,
            sources=_read_sources(sources),
        )

    async def get_task_log(self, task_id: str, offset: int = 0, limit: int = 100) -> TaskLogPage:
        """A page of a task's run log. Like a result, readable by anyone holding the task id."""
        check_paging(offset, limit, max_limit=MAX_LOG_PAGE)
        await self.store.flush()
        task = await self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"unknown task_id {task_id!r}")
        events, total = await self.store.get_task_events(task_id, offset, limit)
        size, kept = 0, 0
        for event in events:
            size += len(event.message) + len(event.data_json or "")
            if kept and size > LOG_PAGE_CHARS:
                break
            kept += 1
        events = events[:kept]
        end = offset + len(events)
        return TaskLogPage(
            task_id=task_id,
            status=TaskStatus(task.status),
            offset=offset,
            total=total,
            events=[
                TaskLogEvent(
                    seq=e.seq, at=e.logged_at, attempt=e.attempt, kind=e.kind, message=e.message, data=e.data
                )
                for e in events
            ],
            next_offset=end if end < total else None,
        )

    # ---- retention -------------------------------------------------------
