"""Engine: submit, cancel, get, list, notifications — the API every surface calls.

The engine owns its store (DuckDB allows one writing process), so the
state of unfinished work lives in memory with the database as its durable
copy. Reads first wait for writes already enqueued (read-your-writes), then
go to the database.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

import anyio

from sidequest.agents import Agent, AgentLookupError, AgentRegistry
from sidequest.config import Settings
from sidequest.engine.dispatcher import Dispatcher, RunningAttempt
from sidequest.engine.errors import InvalidRequest, NotFinished, NotFound, QueueFull
from sidequest.engine.notifier import DEFAULT_READER, Listener, Notifier, reader_key
from sidequest.engine.retention import Retention
from sidequest.engine.retry import backoff_delay
from sidequest.engine.scheduler import Clock, Scheduler
from sidequest.engine.tasklog import TaskLog
from sidequest.executors.base import ExecutionResult, PermanentError, RetryableError, TaskContext
from sidequest.executors.sandbox import is_inside
from sidequest.models import (
    MAX_WAIT_SECONDS,
    MAX_WAIT_TASKS,
    AgentInfo,
    AgentList,
    AgentProblem,
    Attempt,
    CancelResult,
    GcReport,
    Notification,
    NotificationKind,
    NotificationPage,
    Progress,
    ResultPage,
    RetryBackoff,
    ScheduleCreated,
    ScheduleDeleted,
    ScheduleInfo,
    SchedulePage,
    ScheduleRuns,
    ScheduleSpec,
    ScheduleUpdate,
    Source,
    StatusReport,
    TaskInfo,
    TaskLogEvent,
    TaskLogPage,
    TaskOptions,
    TaskStatus,
    TaskSubmitted,
    Usage,
    WaitedTask,
    WaitMode,
    WaitResult,
    WorkflowInfo,
    WorkflowPage,
    WorkflowStatus,
    as_utc,
    utcnow,
)
from sidequest.storage.base import (
    AttemptRecord,
    Committed,
    FireRecord,
    LoadedState,
    ResultRecord,
    ScheduleRecord,
    Store,
    StoreError,
    StoreUnavailable,
    TaskRecord,
    UsageRecord,
    WorkflowQuery,
    WorkflowRecord,
)

log = logging.getLogger(__name__)

_NOTIFY_PREVIEW = 200
PROMPT_PREVIEW_CHARS = 160
"""Enough to tell tasks apart in a status or a list; the whole prompt is on REST and `sidequest show`."""
_FINISHED = {s.value for s in (TaskStatus.completed, TaskStatus.failed, TaskStatus.cancelled)}


def _finished_counts(counts: dict[str, int]) -> Counter[str]:
    return Counter({status: n for status, n in counts.items() if status in _FINISHED})


def new_id(prefix: str) -> str:
    """Unguessable: an id is a capability to read and cancel a task."""
    return f"{prefix}_{secrets.token_urlsafe(16)}"


def default_scope() -> str:
    return os.environ.get("CLAUDE_PROJECT_DIR") or os.getcwd()


def _clean(text: str) -> str:
    """Text from executors may hold lone surrogates; the store takes only valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def _require_utf8(field: str, value: str | None) -> None:
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{field} is not valid UTF-8 text (position {exc.start})") from exc


_INT64_MAX = 2**63 - 1
HELD_PAYLOAD_BUDGET = 64 << 20
"""Bytes of queued prompts and options kept in memory; the rest wait on disk (read per attempt)."""


def _payload_size(prompt: str, options: dict[str, Any]) -> int:
    return len(prompt.encode("utf-8")) + len(json.dumps(options, ensure_ascii=False).encode("utf-8"))


MAX_LOG_PAGE = 1000
LOG_PAGE_CHARS = 40_000
"""A page of the run log stops once its entries hold this much text (the first entry always comes):
a model reads a page whole, and 100 entries of tool input could be most of a megabyte."""
MAX_SOURCES = 200
"""Cited pages kept with a result; a research answer cites tens."""
"""Most run-log entries one read returns."""
MAX_OFFSET = 2**31 - 1
"""Offsets and cursors beyond this are typos (and overflow the store's integer types)."""


def _check_paging(offset: int, limit: int, max_limit: int, limit_name: str = "limit") -> None:
    if not 0 <= offset <= MAX_OFFSET:
        raise InvalidRequest(f"offset must be between 0 and {MAX_OFFSET}, got {offset}")
    if not 1 <= limit <= max_limit:
        raise InvalidRequest(f"{limit_name} must be between 1 and {max_limit}, got {limit}")


def _absolute(path: str, what: str) -> str:
    """Scopes are absolute, normalised paths (`..` and `//` removed), so one folder has one name."""
    if "\x00" in path or not os.path.isabs(path):
        raise InvalidRequest(f"{what} must be an absolute path, got {path!r}")
    return os.path.normpath(path)


def _short(text: str | None, limit: int) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def _plain_sources(sources: object) -> list[dict[str, Any]] | None:
    """The cited pages an executor returned, as rows the store can always write: agent code may hand
    back anything (a datetime, NaN, a missing url), and one bad value must not fail the commit that
    carries other tasks' results. Entries that are not a page are dropped."""
    if not isinstance(sources, list):
        return None
    kept = []
    for raw in sources[:MAX_SOURCES]:
        if not isinstance(raw, dict):
            continue
        try:
            source = Source.model_validate({k: raw.get(k) for k in ("n", "title", "url")}, strict=False)
        except ValueError:
            continue
        title = _clean(source.title)[:500] if source.title else None
        kept.append({"n": source.n, "title": title, "url": _clean(source.url)[:4000]})
    return kept or None


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
        where.append(repr(_short(task.progress_message, 80)))
    if task.status == TaskStatus.retrying and task.next_attempt_at is not None:
        where.append(f"next attempt at {task.next_attempt_at.isoformat(timespec='seconds')}")
    detail = f" ({', '.join(where)})" if where else ""
    return (
        f"task {task.id} is {task.status}{detail} and has no result until it finishes; call "
        f"wait_for_tasks(task_ids=[{task.id!r}]) to wait for it, or read get_workflow_notifications later"
    )


def _duration(seconds: float) -> str:
    """'45s', '2m10s', '3h05m': how a person says how long something took."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _took(seconds: float) -> str:
    """An attempt's length: fractions under a minute (most attempts are short), else as _duration."""
    seconds = max(seconds, 0.0)
    return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s" if seconds < 60 else _duration(seconds)


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
    took = _duration(elapsed)
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
                f" in {_duration((task.next_attempt_at - now).total_seconds())}"
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
            f"running for {_duration(elapsed)}: {finished} of {sum(counts.values())} tasks finished "
            f"({summary}); check again {_check_again(elapsed)}, or call wait_for_tasks"
        )
    retry = "; retry_task runs a failed or cancelled task again" if workflow.status != "completed" else ""
    took = _duration(elapsed)
    return f"{workflow.status.value} in {took} ({summary}); read outputs with get_task_result{retry}"


class Engine:
    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        registry: AgentRegistry | None = None,
        clock: Clock | None = None,
    ):
        self.settings = settings
        if store is None:
            from sidequest.storage.duckdb import DuckDBStore

            store = DuckDBStore(settings.database_path)
        self.store = store
        self.agents = registry or AgentRegistry.from_settings(settings)
        self._retired_registries: list[AgentRegistry] = []
        """Registries a reload replaced: closed at shutdown, since running attempts may use them."""
        self.worker_id = new_id("w")
        self.notifier = Notifier(store)
        self.dispatcher = Dispatcher(
            settings.max_concurrency,
            self._agent_limit,
            self._start_attempt,
            self._run_attempt,
            self._ready_task,
        )
        self._live: dict[str, TaskRecord] = {}
        self._workflows: dict[str, WorkflowRecord] = {}
        self._wf_open: Counter[str] = Counter()
        self._wf_counts: dict[str, Counter[str]] = {}
        self._idempotency: dict[tuple[str, str], tuple[str, datetime | None]] = {}
        """(scope, key) -> (task id, when it finished): live tasks' keys and those still inside
        `idempotency_window`, so a submit never reads the store to find its key."""
        self._held: dict[str, int] = {}
        """Bytes of prompt and options held in memory per live task (see HELD_PAYLOAD_BUDGET)."""
        self._inserting: dict[str, anyio.Event] = {}
        self._limits: dict[str, int | None] = {}
        self._held_total = 0
        self._seq = 0
        self._loop_thread: int | None = None
        self._started = False
        self.failure: StoreUnavailable | None = None
        self.failed = anyio.Event()
        """Set when the store failed: the process must stop (fail-stop) and recover at its next start."""
        self.scheduler = Scheduler(self, clock)
        self.tasklog = TaskLog(store, settings.task_log)

    # ---- lifecycle -------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Engine]:
        """Open the store, recover lapsed work, run the pool; on exit drain gracefully."""
        state = await anyio.to_thread.run_sync(self.store.open)
        self.store.on_failure(self._on_store_failure)
        self._loop_thread = threading.get_ident()
        try:
            self._load(state)
            # Recovery's writes (lost attempts, poisonous failures) are durable before anything runs
            # again: an agent that kills the process at once must find its death counted next time.
            await self.store.sync()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.store.run_writer, self.notifier.committed)
                tg.start_soon(self.dispatcher.run)
                tg.start_soon(self._renew_leases)
                tg.start_soon(self._forget_idempotency_keys)
                tg.start_soon(self.scheduler.run)
                tg.start_soon(self.retention.run)
                self._started = True
                try:
                    yield self
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._shutdown()
                    tg.cancel_scope.cancel()
        finally:
            self._started = False
            with anyio.CancelScope(shield=True):
                await self.agents.aclose()
                for retired in self._retired_registries:
                    await retired.aclose()
            await anyio.to_thread.run_sync(self.store.close)

    def apply_settings(self, settings: Settings, registry: AgentRegistry) -> None:
        """A reloaded configuration (sidequest.reload), built and checked by the caller.

        Attempts already running keep the executor they started with; the old registry's
        connections are closed when the engine stops, not now, because those attempts may
        still use them. New limits apply to the next dispatch, new agents to the next submit.
        """
        self._retired_registries.append(self.agents)
        self.settings = settings
        self.agents = registry
        for name, agent in registry.config_agents().items():
            self._limits[name] = agent.max_concurrency
        self.dispatcher.max_concurrency = settings.max_concurrency
        self.dispatcher.wake()
        self.scheduler.config = settings.schedules
        self.retention.reconfigure(settings)
        self.tasklog.reconfigure(settings.task_log)

    def _load(self, state: LoadedState) -> None:
        self._seq = state.max_seq
        self.notifier.start_at(state.max_cursor)
        self._workflows = dict(state.live_workflows)
        for wid, counts in state.workflow_counts.items():
            self._wf_counts[wid] = _finished_counts(counts)
            self._wf_open[wid] = sum(n for s, n in counts.items() if s not in _FINISHED)
        horizon = utcnow() - timedelta(seconds=self.settings.idempotency_window)
        for scope, key, task_id, finished in state.idempotency:
            if finished is None or finished > horizon:
                self._idempotency[(scope, key)] = (task_id, finished)
        for task in state.live_tasks:
            self._live[task.id] = task
            if task.prompt is not None:
                self._hold(task, _payload_size(task.prompt, task.options or {}))
            if task.agent not in self._limits:
                try:
                    found = self.agents.get(task.agent, task.project)
                except OSError:  # an unreadable agent folder: the attempt will say so, not the start
                    found = None
                self._limits[task.agent] = found.max_concurrency if found else None
        exclusive = getattr(self.store, "exclusive", True)
        now = utcnow()
        for task in state.live_tasks:
            if task.status == TaskStatus.running:
                lapsed = exclusive or task.lease_expires_at is None or task.lease_expires_at <= now
                if lapsed:
                    self._recover_lapsed(task, now)
                    continue
            if task.id in self._live:
                self.dispatcher.enqueue(task)
        # A workflow left running with nothing open (a crash between writes) is finished now.
        for wid in [w for w in self._workflows if self._wf_open[w] <= 0]:
            self._finish_workflow(wid, now)

    def _recover_lapsed(self, task: TaskRecord, now: datetime) -> None:
        """The process running this attempt died. That is not the task's failure (it may have been
        a bystander of another task's crash), so it does not use up `max_retries`; but a task
        present at `max_lost_attempts` deaths is failed as poisonous, or it would crash every
        restart forever. Until then it runs again, alone (see Dispatcher), so a crash it causes
        is counted against it and not against tasks beside it."""
        error = f"attempt {task.attempts} was lost: the process running it stopped and its lease lapsed"
        self.store.add_attempt(
            AttemptRecord(task.id, task.attempts, "lost", task.started_at, now, error, task.worker_id)
        )
        log.warning("task %s: %s", task.id, error)
        self.tasklog.lost(task.id, task.attempts, now)
        task.lost_attempts += 1
        task.worker_id = None
        task.lease_expires_at = None
        task.updated_at = now
        if task.lost_attempts >= self.settings.max_lost_attempts:
            deaths = task.lost_attempts
            task.failures += 1
            task.error = (
                f"poisonous: the process died {deaths} time{'s' if deaths != 1 else ''} while it ran "
                f"(max_lost_attempts is {self.settings.max_lost_attempts}); run it with an isolated "
                'agent (isolation = "process") or fix what kills the process'
            )
            self._fail_task(task, task.error, now)
            return
        task.status = TaskStatus.queued.value
        task.next_attempt_at = None
        self.store.update_task(task)
        self.dispatcher.enqueue(task)

    def _on_store_failure(self, failure: StoreUnavailable) -> None:
        """Fail-stop: start nothing more, stop what runs (its writes could not be kept; it runs
        again after the restart), and tell whoever runs us to stop the process."""
        self.failure = failure
        self.dispatcher.accepting = False
        self.dispatcher.stop_all("store_failed")
        self.failed.set()

    async def _shutdown(self) -> None:
        grace = 0.0 if self.failure is not None else self.settings.shutdown_grace
        stopped = await self.dispatcher.drain(grace)
        if stopped and self.failure is None:
            log.info("put %d running task(s) back in the queue at shutdown", len(stopped))
        try:
            await self.store.flush()
        except StoreError as exc:
            log.error("not everything could be written at shutdown: %s", exc)

    async def _renew_leases(self) -> None:
        interval = max(0.05, self.settings.lease_seconds / 3)
        while True:
            await anyio.sleep(interval)
            expires = utcnow() + timedelta(seconds=self.settings.lease_seconds)
            for attempt in self.dispatcher.running.values():
                attempt.task.lease_expires_at = expires
                self.store.update_task(attempt.task)

    async def _forget_idempotency_keys(self) -> None:
        """Keys outlive their task by `idempotency_window`; then memory and the store drop them."""
        while True:
            horizon = utcnow() - timedelta(seconds=self.settings.idempotency_window)
            expired = [
                k for k, (_, done) in self._idempotency.items() if done is not None and done <= horizon
            ]
            for key in expired:
                del self._idempotency[key]
            try:
                await self.store.purge_idempotency_keys(horizon)
            except StoreError:
                return  # fail-stop is under way
            await anyio.sleep(min(3600.0, max(1.0, self.settings.idempotency_window / 10)))

    def _hold(self, task: TaskRecord, size: int) -> None:
        """Keep a task's prompt and options in memory while the budget allows; beyond it they stay
        on disk and are read when its attempt starts (a queue of large prompts stays small)."""
        if self._held_total + size <= HELD_PAYLOAD_BUDGET:
            self._held[task.id] = size
            self._held_total += size
        else:
            task.prompt, task.options = None, None

    def _release(self, task_id: str) -> None:
        self._held_total -= self._held.pop(task_id, 0)

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        return self.notifier.add_listener(listener)

    # ---- submit ----------------------------------------------------------

    def admit_scope(self, requested: str | None, project: str | None) -> tuple[str, str | None]:
        """(the task's scope, the caller's trusted project) for one request.

        Trust is per request, never remembered: `project` is the caller's own project (the
        front's header, the embedded server's directory), and it and `allowed_roots` are the only
        places the task's processes may run and its agent files are read. A model-typed scope may
        narrow inside them; it cannot widen: outside them, `/`, or the home directory is refused.
        Without a project, a scope is only a label for listing (it makes nothing trusted)."""
        if project is not None:
            project = _absolute(project, "the caller's project")
        if requested is None:
            return project or default_scope(), project
        if project is None:
            return requested, None
        scope = _absolute(requested, "options.scope")
        real = os.path.realpath(scope)
        home = os.path.realpath(os.path.expanduser("~"))
        roots = [os.path.realpath(project), *(os.path.realpath(r) for r in self.settings.allowed_roots)]
        if real in ("/", home) and real not in roots:
            raise InvalidRequest(
                f"options.scope {requested!r} is {'the root folder' if real == '/' else 'the home folder'}; "
                f"a scope may only narrow to a folder inside your project {project!r}"
            )
        if not any(is_inside(real, root) for root in roots):
            raise InvalidRequest(
                f"options.scope {requested!r} is outside your project {project!r}"
                + (f" and allowed_roots ({', '.join(roots[1:])})" if roots[1:] else "")
                + "; a scope may only narrow to a folder inside them (omit it to use your project)"
            )
        return scope, project

    def workdir_roots(self, scope: str, project: str | None) -> list[str]:
        """Where a task's processes may run: its scope (inside its caller's project, checked at
        admission) when the caller named a project, and `allowed_roots`."""
        roots = [os.path.realpath(root) for root in self.settings.allowed_roots]
        if project is not None and os.path.isabs(scope) and os.path.isdir(scope):
            # Checked again now, not only at admission: a symlink in the scope may since point
            # elsewhere (`ln -s / project/later`), and a schedule fires for months.
            real = os.path.realpath(scope)
            if any(is_inside(real, root) for root in [os.path.realpath(project), *roots]):
                roots.insert(0, real)
        return roots

    def list_agents(
        self, scope: str | None = None, project: str | None = None
    ) -> tuple[list[AgentInfo], list[AgentProblem]]:
        """Agents this caller may launch, and agent files that are broken (so the user can fix them).

        Agent files come from the caller's project, the user's folder and configured folders,
        never from a folder a model typed (`scope` is accepted for the surfaces' sake)."""
        try:
            catalog = self.agents.catalog(project)
        except OSError as exc:  # e.g. a project path the OS refuses (name too long)
            raise InvalidRequest(f"cannot read the agent folders of {project!r}: {exc}") from exc
        return [a.info() for a in catalog.agents.values()], catalog.problems

    async def agent_list(self, scope: str | None = None, project: str | None = None) -> AgentList:
        """`list_agents` for async surfaces: reading agent files is disk work, kept off the loop."""
        agents, problems = await anyio.to_thread.run_sync(self.list_agents, scope, project)
        return AgentList(agents=agents, problems=problems)

    def _resolve_agent(self, agent: str, project: str | None) -> Agent:
        try:
            found = self.agents.resolve(agent, project)
        except AgentLookupError as exc:
            hint = (
                " (no trusted project is known for this request or schedule, so no project agent "
                "files are read: a schedule made before projects were tracked must be made again "
                "from its project)"
                if project is None
                else ""
            )
            raise InvalidRequest(f"{exc}{hint}") from exc
        except OSError as exc:  # e.g. a project path the OS refuses (name too long)
            raise InvalidRequest(f"cannot look up agent {agent!r} in {project!r}: {exc}") from exc
        self._limits[agent] = found.max_concurrency
        return found

    def _validate_submit(self, agent: str, prompt: str, options: TaskOptions) -> int:
        """Refuse what cannot be stored or run; returns the payload's size (prompt and options),
        which submit reuses for the memory budget instead of serialising the options again."""
        if not agent.strip():
            raise InvalidRequest("agent_definition is empty; call list_agents for the names you may use")
        _require_utf8("agent_definition", agent)
        if not prompt.strip():
            raise InvalidRequest("prompt is empty; say what the agent should do")
        _require_utf8("prompt", prompt)
        for field in ("workflow_id", "workflow_name", "idempotency_key", "scope", "cwd", "resume_task_id"):
            _require_utf8(f"options.{field}", getattr(options, field))
        for tag in options.tags:
            _require_utf8("options.tags", tag)
        metadata = json.dumps(options.metadata, ensure_ascii=False)
        _require_utf8("options.metadata", metadata)
        size = len(prompt.encode("utf-8"))
        if size > self.settings.max_prompt_bytes:
            raise InvalidRequest(
                f"prompt is {size} bytes, over the {self.settings.max_prompt_bytes}-byte limit "
                "(max_prompt_bytes in the config); pass a file path or a summary instead"
            )
        payload = _payload_size(prompt, options.model_dump(mode="json", exclude_defaults=True))
        total = payload + len(agent)
        if total > self.settings.max_request_bytes:
            meta, tags = len(metadata.encode()), len(json.dumps(options.tags, ensure_ascii=False).encode())
            raise InvalidRequest(
                f"the request is {total} bytes (prompt {size}, metadata {meta}, tags {tags}, the rest of "
                f"the options {max(0, total - size - meta - tags - len(agent))}), over the "
                f"{self.settings.max_request_bytes}-byte limit for a whole submit (max_request_bytes in "
                "the config); put large inputs in a file and pass its path"
            )
        if options.timeout is not None and options.timeout > self.settings.max_timeout:
            raise InvalidRequest(
                f"timeout {options.timeout:g}s is over the {self.settings.max_timeout:g}s maximum "
                "(max_timeout in the config)"
            )
        return payload

    def check_task(self, agent: str, prompt: str, options: TaskOptions, project: str | None) -> Agent:
        """What submit would refuse, without submitting (a schedule's runs must be able to start)."""
        self._validate_submit(agent, prompt, options)
        return self._resolve_agent(agent, project)

    def _new_task(
        self,
        resolved: Agent,
        agent: str,
        prompt: str,
        options: TaskOptions,
        scope: str,
        workflow_id: str,
        now: datetime,
    ) -> TaskRecord:
        """The queued row of a new task, whoever starts it (a client's submit, a schedule's run)."""
        timeout = options.timeout
        if timeout is None:
            timeout = resolved.timeout if resolved.timeout is not None else self.settings.default_timeout
        self._seq += 1
        return TaskRecord(
            id=new_id("t"),
            seq=self._seq,
            workflow_id=workflow_id,
            agent=agent,
            prompt=prompt,
            status=TaskStatus.queued.value,
            priority=options.priority,
            scope=scope,
            options=options.model_dump(mode="json", exclude_defaults=True),
            max_retries=options.max_retries,
            created_at=now,
            updated_at=now,
            callback_url=str(options.callback_url) if options.callback_url else None,
            timeout_s=timeout,
        )

    async def submit(
        self, agent: str, prompt: str, options: TaskOptions | None = None, *, project: str | None = None
    ) -> TaskSubmitted:
        """Durably record a task and hand it to the pool; returns once the row is committed.

        `project` is the caller's own project, from the surface (never from the arguments a
        model types): see `admit_scope`."""
        self._require_running()
        options = options or TaskOptions()
        payload = self._validate_submit(agent, prompt, options)
        scope, project = self.admit_scope(options.scope, project)

        if options.idempotency_key:
            earlier = await self._existing_submission(scope, options.idempotency_key)
            if earlier is not None:
                return earlier
        self._check_queue()

        now = utcnow()
        new_workflow: WorkflowRecord | None = None
        reopen: WorkflowRecord | None = None
        reopen_counts: Counter[str] = Counter()
        if options.workflow_id:
            workflow = self._workflows.get(options.workflow_id) or await self.store.get_workflow(
                options.workflow_id
            )
            if workflow is None:
                raise NotFound(
                    f"unknown workflow_id {options.workflow_id!r}; omit it to start a new workflow "
                    "or pass workflow_name to name one"
                )
            if options.scope and scope != workflow.scope:
                raise InvalidRequest(
                    f"workflow {workflow.id} belongs to scope {workflow.scope!r}, not {scope!r}"
                )
            scope = workflow.scope
            if workflow.id not in self._workflows:
                reopen = workflow
                reopen_counts = _finished_counts(
                    (await self.store.workflow_counts([workflow.id]))[workflow.id]
                )
        else:
            new_workflow = WorkflowRecord(
                id=new_id("wf"),
                name=options.workflow_name or agent,
                scope=scope,
                status=WorkflowStatus.running.value,
                created_at=now,
                updated_at=now,
            )
        workflow_id = options.workflow_id or new_workflow.id  # type: ignore[union-attr]

        resolved = self._resolve_agent(agent, project)
        warnings = await self._preflight(resolved, options, scope, project)

        if options.idempotency_key:  # re-check: the workflow lookup may have awaited
            earlier = await self._existing_submission(scope, options.idempotency_key)
            if earlier is not None:
                return earlier
        self._check_queue()

        not_before = options.not_before
        if options.delay:
            not_before = now + timedelta(seconds=options.delay)
        task = self._new_task(resolved, agent, prompt, options, scope, workflow_id, now)
        task.project = project
        task.idempotency_key = options.idempotency_key
        task.not_before = not_before
        inserted = anyio.Event()
        self._inserting[task.id] = inserted
        key = (scope, options.idempotency_key) if options.idempotency_key else None
        earlier = self._idempotency.get(key) if key else None
        if key:
            self._idempotency[key] = (task.id, None)
        try:
            with anyio.CancelScope(shield=True):  # committed means queued here too, even if we are cancelled
                await self.store.insert([new_workflow] if new_workflow else [], [task])
        except BaseException:
            if key:
                if earlier is not None:
                    self._idempotency[key] = earlier
                else:
                    self._idempotency.pop(key, None)
            raise
        finally:
            self._inserting.pop(task.id, None)
            inserted.set()

        self._live[task.id] = task
        self.tasklog.created(task.id)
        self._hold(task, payload)
        if new_workflow is not None:
            self._workflows[new_workflow.id] = new_workflow
            self._wf_counts[new_workflow.id] = Counter()
        elif (
            reopen is not None and reopen.id not in self._workflows
        ):  # a concurrent join may have reopened it
            reopen.status, reopen.updated_at, reopen.finished_at = WorkflowStatus.running.value, now, None
            self._workflows[reopen.id] = reopen
            self._wf_counts[reopen.id] = reopen_counts
        self._wf_open[workflow_id] += 1
        self.dispatcher.enqueue(task)
        return TaskSubmitted(
            task_id=task.id,
            workflow_id=workflow_id,
            status=TaskStatus(task.status),
            created_at=task.created_at,
            warnings=warnings,
        )

    async def _preflight(
        self, agent: Agent, options: TaskOptions, scope: str, project: str | None
    ) -> list[str]:
        """Reject what cannot work (a session that does not exist); warn about what may fail (no key)."""
        if options.resume_task_id:
            earlier = await self._record(options.resume_task_id)
            if earlier is None or earlier.scope != scope:
                raise InvalidRequest(f"resume_task_id {options.resume_task_id!r}: no such task in this scope")
            if agent.executor.name != "claude-code":
                raise InvalidRequest(
                    f"resume_task_id only works with claude-code agents; {agent.name!r} runs on "
                    f"{agent.executor.name!r}"
                )
        preflight = getattr(agent.executor, "preflight", None)
        if preflight is None:
            return []
        return list(preflight(options, scope, self.workdir_roots(scope, project)))

    def _known_key(self, scope: str, key: str) -> str | None:
        """The task this key made, while it still deduplicates: unfinished, or finished inside
        `idempotency_window` (the same key then returns that task whatever its state)."""
        found = self._idempotency.get((scope, key))
        if found is None:
            return None
        task_id, finished = found
        if finished is not None and utcnow() - finished > timedelta(seconds=self.settings.idempotency_window):
            return None
        return task_id

    def _check_queue(self) -> None:
        unfinished = len(self._live) + len(self._inserting)  # submits in flight count too
        if unfinished >= self.settings.max_queued_tasks:
            raise QueueFull(
                f"queue full: {unfinished} tasks are unfinished, the limit is "
                f"{self.settings.max_queued_tasks} (max_queued_tasks in the config); wait for some to "
                "finish or cancel some, then submit again"
            )

    async def _existing_submission(self, scope: str, key: str) -> TaskSubmitted | None:
        """The earlier task this key made, or None when the key is free (never used, past its
        window, or its task is gone: deleted by retention, or its insert failed)."""
        task_id = self._known_key(scope, key)
        if task_id is None:
            return None
        pending = self._inserting.get(task_id)
        if pending is not None:
            await pending.wait()
        task = await self._record(task_id)
        if task is None:
            if self._idempotency.get((scope, key), (None,))[0] == task_id:
                del self._idempotency[(scope, key)]
            return None
        return TaskSubmitted(
            task_id=task.id,
            workflow_id=task.workflow_id,
            status=TaskStatus(task.status),
            created_at=task.created_at,
            deduplicated=True,
        )

    async def _record(self, task_id: str) -> TaskRecord | None:
        """The live record when there is one (it is ahead of the store), else the stored row."""
        return self._live.get(task_id) or await self.store.get_task(task_id)

    def _require_running(self) -> None:
        if self.failure is not None:
            raise self.failure
        if not self._started:
            raise InvalidRequest("the engine is not running")

    # ---- running attempts ------------------------------------------------

    def _agent_limit(self, agent: str) -> int | None:
        """Set when the agent is resolved (submit, restart); files are never read on the dispatch path."""
        return self._limits.get(agent)

    def _ready_task(self, task_id: str) -> TaskRecord | None:
        task = self._live.get(task_id)
        if task is None or task.status not in (TaskStatus.queued, TaskStatus.retrying):
            return None
        return task

    def _start_attempt(self, task: TaskRecord) -> RunningAttempt:
        now = utcnow()
        task.status = TaskStatus.running.value
        task.attempts += 1
        task.started_at = now
        task.updated_at = now
        task.next_attempt_at = None
        task.worker_id = self.worker_id
        task.lease_expires_at = now + timedelta(seconds=self.settings.lease_seconds)
        self.store.attempt_started(task)  # a crash from here on is counted against this task
        ctx = TaskContext(
            task_id=task.id,
            workflow_id=task.workflow_id,
            agent=task.agent,
            attempt=task.attempts,
            scope=task.scope,
            metadata=dict((task.options or {}).get("metadata", {})),
            _on_progress=lambda p, m: self._call_in_loop(self._progress, task, p, m),
            _on_usage=lambda u: self._call_in_loop(self._record_usage, task, u),
            options=task.options or {},
            session_id=task.session_id,
            batch_id=task.batch_id,
            _on_state=lambda sid, bid: self._call_in_loop(self._save_state, task, sid, bid),
            _on_log=lambda kind, message, data: self._call_in_loop(
                self.tasklog.add_reported, task, kind, message, data
            ),
            _workdir_roots=lambda: self.workdir_roots(task.scope, task.project),
        )
        return RunningAttempt(task=task, ctx=ctx)

    def _call_in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Executors may report from a worker thread; engine state is only touched on the loop."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            anyio.from_thread.run_sync(fn, *args)

    def _record_usage(self, task: TaskRecord, usage: UsageRecord) -> None:
        """Usage comes from agent code (an isolated child may send anything): a value the store
        cannot hold must cost that one record, never the group commit it rides, which would stop
        the daemon (fail-stop). Filed under this task's current attempt, whatever ids it names."""

        def count(value: object) -> int:
            try:
                number = int(value)  # type: ignore[call-overload]
            except (TypeError, ValueError, OverflowError):
                return 0
            return min(max(number, 0), _INT64_MAX)

        cost = usage.cost_usd
        if cost is not None:
            try:
                cost = float(cost)
            except (TypeError, ValueError, OverflowError):
                cost = None
            if cost is not None and not math.isfinite(cost):
                cost = None
        model = _clean(str(usage.model))[:200] if usage.model else None
        record = UsageRecord(
            task.id,
            task.attempts,
            model,
            count(usage.input_tokens),
            count(usage.output_tokens),
            count(usage.cache_creation_input_tokens),
            count(usage.cache_read_input_tokens),
            cost,
            utcnow(),
        )
        self.store.add_usage(record)
        tokens = f"{record.input_tokens} in, {record.output_tokens} out"
        self.tasklog.add(
            task,
            "usage",
            f"{model or 'usage'}: {tokens}" + (f", ${cost:.4f}" if cost is not None else ""),
            {
                k: v
                for k, v in dataclasses.asdict(record).items()
                if k not in ("task_id", "attempt", "recorded_at")
            },
        )

    def _save_state(self, task: TaskRecord, session_id: str | None, batch_id: str | None) -> None:
        if session_id is not None:
            task.session_id = _clean(session_id)
        if batch_id is not None:
            task.batch_id = _clean(batch_id)
        task.updated_at = utcnow()
        self.store.update_task(task)

    def _progress(self, task: TaskRecord, percent: float | None, message: str | None) -> None:
        if task.status != TaskStatus.running:
            return
        if percent is not None:
            task.progress_percent = percent
        if message is not None:
            task.progress_message = _clean(_short(str(message), 1000))
        task.updated_at = utcnow()
        self.store.update_task(task)
        self.tasklog.add_progress(task, percent, message)

    async def _run_attempt(self, attempt: RunningAttempt) -> None:
        task, ctx = attempt.task, attempt.ctx
        outcome: str
        detail: str | ExecutionResult
        retry_after: float | None = None
        options = task.options
        if self.failure is not None:  # the store failed while this attempt was being started
            self._finish_attempt(task, "store_failed", "store_failed")
            return
        with attempt.scope:
            try:
                await self.tasklog.resume(task)
                log.info("task %s started: agent %s, attempt %d", task.id, task.agent, task.attempts)
                self.tasklog.add(task, "attempt_started", f"attempt {task.attempts} started ({task.agent})")
                prompt = task.prompt
                if prompt is None or options is None:  # a large payload stays on disk until now
                    payload = await self.store.get_payload(task.id)
                    if payload is None:
                        raise PermanentError(f"task {task.id} has no stored prompt")
                    prompt, options = payload
                    ctx.options, ctx.metadata = options, dict(options.get("metadata", {}))
                try:
                    agent = self.agents.resolve(task.agent, task.project)
                except AgentLookupError as exc:
                    raise PermanentError(f"agent {task.agent!r} can no longer be used: {exc}") from exc
                resume = options.get("resume_task_id")
                if resume:
                    earlier = await self._record(resume)
                    ctx.resume_session_id = earlier.session_id if earlier else None
                    if not ctx.resume_session_id:
                        raise PermanentError(f"task {resume} has no session to resume (it saved none)")
                deadline = anyio.current_time() + task.timeout_s if task.timeout_s else math.inf
                with anyio.CancelScope(deadline=deadline) as limit:
                    detail = await agent.executor.run(prompt, ctx)
                if limit.cancelled_caught:  # our deadline, not a TimeoutError the agent raised itself
                    outcome, detail = "timed_out", f"timed out after {task.timeout_s:g}s"
                else:
                    outcome = "completed"
            except PermanentError as exc:
                outcome, detail = "failed_permanently", str(exc) or type(exc).__name__
            except RetryableError as exc:
                outcome, detail, retry_after = "failed", str(exc) or type(exc).__name__, exc.retry_after
            except Exception as exc:
                outcome, detail = "failed", f"{type(exc).__name__}: {exc}"
            except SystemExit as exc:  # an agent calling sys.exit() must not stop the server
                outcome, detail = "failed", f"the agent called sys.exit({exc.code!r})"
        if attempt.stop_reason is not None:
            outcome, detail = attempt.stop_reason, attempt.stop_reason
        self._finish_attempt(task, outcome, detail, retry_after, options)

    def _finish_attempt(
        self,
        task: TaskRecord,
        outcome: str,
        detail: str | ExecutionResult,
        retry_after: float | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        now = utcnow()
        started = task.started_at
        error = None if isinstance(detail, ExecutionResult) else _clean(detail)
        history_status = {"failed_permanently": "failed", "shutdown": "interrupted"}.get(outcome, outcome)
        self._log_attempt_end(task, history_status, error, now)
        if task.status == TaskStatus.cancelled:
            self.tasklog.forget(task.id)  # cancelled while it ran: that finish was its last entry
        self.store.add_attempt(
            AttemptRecord(task.id, task.attempts, history_status, started, now, error, self.worker_id)
        )
        task.worker_id = None
        task.lease_expires_at = None
        task.updated_at = now
        if outcome == "store_failed":
            return  # nothing more can be written; the restart runs it again
        if outcome == "cancelled" or task.status == TaskStatus.cancelled:
            return  # cancel() already recorded the final state
        if outcome == "shutdown":
            task.status = TaskStatus.queued.value
            task.attempts -= 1  # an interrupted attempt is not one of the task's tries
            self.store.update_task(task)
            return
        if outcome == "completed":
            assert isinstance(detail, ExecutionResult)
            self._complete(task, detail, now)
            return
        permanent = outcome == "failed_permanently"
        self._after_failure(
            task, _clean(str(detail)), permanent=permanent, now=now, min_delay=retry_after, options=options
        )

    def _log_attempt_end(self, task: TaskRecord, status: str, error: str | None, now: datetime) -> None:
        """One line in the daemon's log and one entry in the task's run log per finished attempt."""
        seconds = (now - task.started_at).total_seconds() if task.started_at else 0.0
        # The error stays out of the daemon's log: it is agent text (a program's stderr may hold a
        # token, or lines made to look like ours); the run log and the task's status have it.
        log.info(
            "task %s finished: %s after %s (agent %s, attempt %d)",
            task.id,
            status,
            _took(seconds),
            task.agent,
            task.attempts,
        )
        message = f"attempt {task.attempts} {status} after {_took(seconds)}"
        if error:
            message += f": {error}"
        data: dict[str, Any] = {"status": status, "seconds": round(seconds, 3), "error": error}
        dropped = self.tasklog.dropped(task.id)
        if dropped:
            data["dropped_entries"] = dropped  # past the cap, so far (counted in this process)
        self.tasklog.add(task, "attempt_finished", message, data, now)

    def _complete(self, task: TaskRecord, result: ExecutionResult, now: datetime) -> None:
        result.content = _clean(result.content)
        task.status = TaskStatus.completed.value
        task.finished_at = now
        task.error = None
        task.progress_percent = 100.0
        task.result_preview = result.content[: self.settings.result_preview_chars]
        self.store.add_result(
            ResultRecord(task.id, result.content_type, result.content, now, _plain_sources(result.sources))
        )
        self.store.update_task(task)
        self.notifier.emit(
            NotificationKind.task_completed,
            task.workflow_id,
            task.scope,
            f"Task {task.id} ({task.agent}) completed: {_short(result.content, _NOTIFY_PREVIEW)}",
            task_id=task.id,
        )
        self._task_finished(task, now)

    def _after_failure(
        self,
        task: TaskRecord,
        error: str,
        permanent: bool,
        now: datetime,
        min_delay: float | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        task.failures += 1
        task.error = _short(error, 4000) if len(error) > 4000 else error
        task.worker_id = None
        task.lease_expires_at = None
        task.updated_at = now
        if permanent or task.failures > task.max_retries:
            self._fail_task(task, error, now)
            return
        options = options if options is not None else task.options or {}
        policy = RetryBackoff.model_validate(options.get("retry_backoff", {}))
        task.status = TaskStatus.retrying.value
        delay = max(backoff_delay(policy, task.failures), min_delay or 0.0)
        task.next_attempt_at = now + timedelta(seconds=delay)
        self.store.update_task(task)
        self.tasklog.add(
            task,
            "retry_scheduled",
            f"retry {task.failures} of {task.max_retries} in {_took(delay)}: {_short(error, 500)}",
            {"reason": error, "delay_seconds": round(delay, 3), "failures": task.failures},
            now,
        )
        self.dispatcher.enqueue(task)

    def _fail_task(self, task: TaskRecord, error: str, now: datetime) -> None:
        task.status = TaskStatus.failed.value
        task.finished_at = now
        task.next_attempt_at = None
        self.store.update_task(task)
        tries = f"after {task.attempts} attempt{'s' if task.attempts != 1 else ''}"
        self.notifier.emit(
            NotificationKind.task_failed,
            task.workflow_id,
            task.scope,
            f"Task {task.id} ({task.agent}) failed {tries}: {_short(error, _NOTIFY_PREVIEW)}",
            task_id=task.id,
        )
        self._task_finished(task, now)

    def _task_finished(self, task: TaskRecord, now: datetime) -> None:
        self._live.pop(task.id, None)
        if task.id not in self.dispatcher.running:  # else its attempt's finish is still to be logged
            self.tasklog.forget(task.id)
        self._release(task.id)
        if task.schedule_id:
            self.scheduler.wake()  # a run queued behind this one (overlap=queue) may start now
        if task.idempotency_key:
            key = (task.scope, task.idempotency_key)
            found = self._idempotency.get(key)
            if found is not None and found[0] == task.id:
                self._idempotency[key] = (task.id, now)  # still deduplicates for the window
        wid = task.workflow_id
        self._wf_counts.setdefault(wid, Counter())[task.status] += 1
        self._wf_open[wid] -= 1
        if self._wf_open[wid] <= 0:
            self._finish_workflow(wid, now, only_agent=task.agent)

    def _finish_workflow(self, wid: str, now: datetime, only_agent: str | None = None) -> None:
        """Emit workflow_completed, except for an unnamed one-task workflow.

        There the task's own notification already says everything; a second
        one would only cost the model tokens (and the store a row).
        """
        workflow = self._workflows.pop(wid, None)
        counts = self._wf_counts.pop(wid, Counter())
        self._wf_open.pop(wid, None)
        if workflow is None:
            return
        if counts[TaskStatus.failed.value]:
            status = WorkflowStatus.failed
        elif counts[TaskStatus.completed.value]:
            status = WorkflowStatus.completed
        else:
            status = WorkflowStatus.cancelled
        workflow.status, workflow.updated_at, workflow.finished_at = status.value, now, now
        if sum(counts.values()) == 1 and workflow.name == only_agent:
            return
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if n)
        self.notifier.emit(
            NotificationKind.workflow_completed,
            wid,
            workflow.scope,
            f"Workflow {workflow.name!r} ({wid}) finished {status.value}: {summary or 'no tasks'}",
        )

    # ---- cancel ----------------------------------------------------------

    async def cancel(self, task_id: str | None = None, workflow_id: str | None = None) -> CancelResult:
        if bool(task_id) == bool(workflow_id):
            raise InvalidRequest("give exactly one of task_id or workflow_id")
        if task_id:
            if task_id in self._live:
                await self._resume_logs([self._live[task_id]])
            if task_id in self._live:
                self._cancel_live(self._live[task_id])
                return CancelResult(cancelled=[task_id])
            await self.store.flush()
            task = await self.store.get_task(task_id)
            if task is None:
                raise NotFound(f"unknown task_id {task_id!r}")
            return CancelResult(cancelled=[], already_finished=[task_id])
        assert workflow_id is not None
        await self.store.flush()
        if workflow_id not in self._workflows and await self.store.get_workflow(workflow_id) is None:
            raise NotFound(f"unknown workflow_id {workflow_id!r}")
        await self._resume_logs([t for t in list(self._live.values()) if t.workflow_id == workflow_id])
        live = [t for t in list(self._live.values()) if t.workflow_id == workflow_id]
        finished = [t.id for t in await self.store.get_tasks(workflow_id) if t.id not in self._live]
        for task in live:
            self._cancel_live(task)
        return CancelResult(cancelled=[t.id for t in live], already_finished=finished)

    async def _resume_logs(self, tasks: list[TaskRecord]) -> None:
        """Where these tasks' logs continue, so that a cancel of a task that never ran in this
        process (loaded at start, still queued) is logged too. A task that finished meanwhile is
        forgotten again."""
        for task in tasks:
            await self.tasklog.resume(task)
            if task.id not in self._live and task.id not in self.dispatcher.running:
                self.tasklog.forget(task.id)

    def _cancel_live(self, task: TaskRecord) -> None:
        now = utcnow()
        self.dispatcher.cancel_running(task.id)
        task.status = TaskStatus.cancelled.value
        task.finished_at = now
        task.updated_at = now
        task.next_attempt_at = None
        self.store.update_task(task)
        self.tasklog.add(task, "cancelled", "the task was cancelled", now=now)
        self.notifier.emit(
            NotificationKind.task_cancelled,
            task.workflow_id,
            task.scope,
            f"Task {task.id} ({task.agent}) was cancelled",
            task_id=task.id,
        )
        self._task_finished(task, now)

    # ---- wait ------------------------------------------------------------

    async def wait_for_tasks(
        self,
        task_ids: list[str] | None = None,
        workflow_id: str | None = None,
        mode: WaitMode = "any",
        timeout: float = 30.0,
    ) -> WaitResult:
        """Return once any (or all) of the tasks finished, or when `timeout` passes.

        A model has no clock: without this it can only poll and burn turns. The wait is woken by
        the engine's commits (never a sleep loop), and it ends after the commit that finished the
        task, so a read right after it sees the final state. `timeout` stays under the clients'
        own tool timeouts (MAX_WAIT_SECONDS)."""
        if bool(task_ids) == bool(workflow_id):
            raise InvalidRequest("give task_ids (a non-empty list) or workflow_id, not both")
        if mode not in ("any", "all"):
            raise InvalidRequest(f"mode must be 'any' or 'all', got {mode!r}")
        if not 0 <= timeout <= MAX_WAIT_SECONDS:
            raise InvalidRequest(
                f"timeout must be between 0 and {MAX_WAIT_SECONDS:g} seconds, got {timeout:g}"
            )
        if workflow_id:
            await self.store.flush()
            if workflow_id not in self._workflows and await self.store.get_workflow(workflow_id) is None:
                raise NotFound(f"unknown workflow_id {workflow_id!r}")
            ids = [t.id for t in await self.store.get_tasks(workflow_id)]
        else:
            ids = list(dict.fromkeys(task_ids or []))
            if len(ids) > MAX_WAIT_TASKS:
                raise InvalidRequest(f"task_ids names {len(ids)} tasks; wait for at most {MAX_WAIT_TASKS}")
            known = await self.task_statuses(ids)
            unknown = [t for t in ids if t not in known]
            if unknown:
                raise NotFound(f"unknown task_id{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
        watched = set(ids)
        started = anyio.current_time()

        def holds() -> bool:
            done = [t not in self._live and t not in self._inserting for t in ids]
            return (any(done) if mode == "any" else all(done)) or not ids

        changed = anyio.Event()

        def on_commit(committed: Committed) -> None:
            if watched & committed.task_ids:
                changed.set()

        remove = self.add_listener(on_commit)
        try:
            with anyio.move_on_after(timeout):
                # A finish is visible in memory before its commit; wait for the commit so the
                # statuses below (read through the store) are the final ones.
                while not holds():
                    await changed.wait()
                    changed = anyio.Event()
                await self.store.flush()
        finally:
            remove()
        met = holds()
        statuses = await self.task_statuses(ids)
        return WaitResult(
            timed_out=not met,
            mode=mode,
            waited_seconds=round(anyio.current_time() - started, 3),
            tasks=[
                WaitedTask(
                    task_id=t, status=TaskStatus(statuses[t]), finished=TaskStatus(statuses[t]).finished
                )
                for t in ids
                if t in statuses
            ],
        )

    # ---- retry -----------------------------------------------------------

    async def retry(self, task_id: str) -> TaskInfo:
        """Put a failed or cancelled task back in the queue, as the same task.

        Its history stays (attempt rows, `attempts` counts on), and it gets a fresh set of
        retries (`failures` and `lost_attempts` start again at zero). Its workflow runs again if
        it had finished. A completed task is not rerun: its result would be replaced."""
        self._require_running()
        live = self._live.get(task_id)
        if live is not None or task_id in self._inserting:
            status = live.status if live is not None else TaskStatus.queued.value
            raise InvalidRequest(
                f"task {task_id} is {status}; only a failed or cancelled task can be retried "
                "(cancel_task stops one that is still running)"
            )
        await self.store.flush()
        task = await self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"unknown task_id {task_id!r}")
        previous = task.status
        if previous == TaskStatus.completed:
            raise InvalidRequest(
                f"task {task_id} completed; only a failed or cancelled task can be retried "
                "(submit a new task to run the work again)"
            )
        if task_id in self.dispatcher.running:
            raise InvalidRequest(
                f"task {task_id} was cancelled and its attempt is still stopping; retry it in a moment"
            )
        self._resolve_agent(task.agent, task.project)  # the agent may be gone: say so now
        self._check_queue()
        wid = task.workflow_id
        workflow: WorkflowRecord | None = None
        counts: Counter[str] = Counter()
        if wid not in self._workflows:
            workflow = await self.store.get_workflow(wid)
            counts = _finished_counts((await self.store.workflow_counts([wid])).get(wid, {}))
        if task_id in self._live:  # a concurrent retry won while we read
            raise InvalidRequest(f"task {task_id} is {self._live[task_id].status}; it was already retried")

        now = utcnow()
        task.status = TaskStatus.queued.value
        task.failures = 0
        task.lost_attempts = 0
        task.finished_at = None
        task.next_attempt_at = None
        task.not_before = None
        task.error = None
        task.result_preview = None
        task.progress_percent = None
        task.progress_message = None
        task.worker_id = None
        task.lease_expires_at = None
        task.updated_at = now
        if wid in self._workflows:  # still open (or reopened by a submit while we read)
            self._wf_counts.setdefault(wid, Counter())[previous] -= 1
        elif workflow is not None:
            counts[previous] -= 1
            workflow.status, workflow.updated_at, workflow.finished_at = (
                WorkflowStatus.running.value,
                now,
                None,
            )
            self._workflows[wid] = workflow
            self._wf_counts[wid] = counts
        self._wf_open[wid] += 1
        self._live[task_id] = task
        if task.prompt is not None:
            self._hold(task, _payload_size(task.prompt, task.options or {}))
        if task.idempotency_key:
            key = (task.scope, task.idempotency_key)
            if self._idempotency.get(key, (task_id,))[0] == task_id:
                self._idempotency[key] = (task_id, None)
        self.store.update_task(task)
        self.notifier.emit(
            NotificationKind.task_retried,
            wid,
            task.scope,
            f"Task {task_id} ({task.agent}) was {previous} and is queued again "
            f"(attempt {task.attempts + 1} next)",
            task_id=task_id,
        )
        self.dispatcher.enqueue(task)
        return self._task_info(task)

    # ---- reads -----------------------------------------------------------

    def _task_info(self, task: TaskRecord, result_chars: int | None = None) -> TaskInfo:
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
        info = self._task_info(task, sizes.get(task_id))
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
        infos = [self._task_info(t, sizes.get(t.id)) for t in tasks]
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

    async def _list(self, query: WorkflowQuery) -> WorkflowPage:
        _check_paging(query.offset, query.limit, max_limit=200)
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
        return await self._list(query)

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
        return await self._list(query)

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
        _check_paging(0, limit, max_limit=1000)
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

    async def schedule_task(
        self, spec: ScheduleSpec, scope: str | None = None, *, project: str | None = None
    ) -> ScheduleCreated:
        self._require_running()
        return await self.scheduler.create(spec, scope, project)

    async def list_schedules(
        self, scope: str | None = None, all_scopes: bool = False, limit: int = 20, offset: int = 0
    ) -> SchedulePage:
        _check_paging(offset, limit, max_limit=1000)
        return await self.scheduler.list(None if all_scopes else (scope or default_scope()), limit, offset)

    async def get_schedule(self, schedule_id: str) -> ScheduleInfo:
        return await self.scheduler.get(schedule_id)

    async def update_schedule(
        self, schedule_id: str, change: ScheduleUpdate, *, project: str | None = None
    ) -> ScheduleInfo:
        self._require_running()
        return await self.scheduler.update(schedule_id, change, project)

    async def delete_schedule(self, schedule_id: str) -> ScheduleDeleted:
        self._require_running()
        return await self.scheduler.delete(schedule_id)

    async def schedule_runs(self, schedule_id: str, limit: int = 20, offset: int = 0) -> ScheduleRuns:
        _check_paging(offset, limit, max_limit=1000)
        return await self.scheduler.runs(schedule_id, limit, offset)

    def is_unfinished(self, task_id: str) -> bool:
        return task_id in self._live

    async def task_statuses(self, task_ids: list[str]) -> dict[str, str]:
        """Live tasks from memory (ahead of the store), the rest in one statement."""
        found = {t: self._live[t].status for t in task_ids if t in self._live}
        rest = [t for t in task_ids if t not in found]
        if rest:
            await self.store.flush()
            found.update(await self.store.task_statuses(rest))
        return found

    def task_info(self, task: TaskRecord) -> TaskInfo:
        return self._task_info(task)

    def notify_schedule(
        self, kind: NotificationKind, schedule: ScheduleRecord, message: str, task_id: str | None
    ) -> None:
        """Schedule events land in the schedule's scope; a run's events also name its workflow."""
        workflow_id = self._live[task_id].workflow_id if task_id and task_id in self._live else ""
        self.notifier.emit(kind, workflow_id, schedule.scope, message, task_id=task_id)

    async def fire_scheduled(
        self, schedule: ScheduleRecord, due: datetime, after: ScheduleRecord, expected: datetime
    ) -> str | None:
        """Start the run of `schedule` due at `due`: the task, its fire key and the schedule's
        new state in one transaction. None when that due time was already fired or the
        schedule changed since it was read (the scheduler reads again)."""
        self._require_running()
        options = TaskOptions.model_validate({**schedule.options, "scope": schedule.scope})
        resolved = self.check_task(schedule.agent, schedule.prompt, options, schedule.project)
        self._check_queue()
        now = utcnow()
        workflow = WorkflowRecord(
            id=new_id("wf"),
            name=schedule.name,
            scope=schedule.scope,
            status=WorkflowStatus.running.value,
            created_at=now,
            updated_at=now,
        )
        task = self._new_task(
            resolved, schedule.agent, schedule.prompt, options, schedule.scope, workflow.id, now
        )
        task.schedule_id = schedule.id
        task.project = schedule.project
        after = dataclasses.replace(after, last_task_id=task.id)
        fire = FireRecord(schedule.id, due, task.id, now)
        if not await self.store.record_fire(fire, after, workflow, task, expected):
            return None
        self._live[task.id] = task
        self.tasklog.created(task.id)
        self._hold(task, _payload_size(schedule.prompt, task.options or {}))
        self._workflows[workflow.id] = workflow
        self._wf_counts[workflow.id] = Counter()
        self._wf_open[workflow.id] += 1
        self.dispatcher.enqueue(task)
        return task.id

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
        known = sorted({c for c in cursors if c <= self.notifier.last_cursor})
        self.store.mark_delivered(key, known, utcnow())
        await self.store.flush()
        return len(known)

    async def task_counts(self) -> dict[str, int]:
        """Tasks by status across every scope, for `sidequest status`."""
        await self.store.flush()
        return await self.store.task_counts()

    @property
    def running_count(self) -> int:
        return len(self.dispatcher.running)

    async def get_result(self, task_id: str, offset: int = 0, max_chars: int = 20_000) -> ResultPage:
        _check_paging(offset, max_chars, max_limit=1_000_000, limit_name="max_chars")
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
        _check_paging(offset, limit, max_limit=MAX_LOG_PAGE)
        await self.store.flush()
        task = await self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"unknown task_id {task_id!r}")
        events, total = await self.store.get_task_events(task_id, offset, limit)
        size, kept = 0, 0
        for event in events:
            size += len(event.message) + (len(json.dumps(event.data)) if event.data is not None else 0)
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

    @cached_property
    def retention(self) -> Retention:
        """Built on first use. Tasks the engine holds (unfinished, or with an attempt still winding
        down after a cancel) are never deleted, whatever their row says."""
        return Retention(
            self.store, self.settings, held=lambda: self._live.keys() | self.dispatcher.running.keys()
        )

    async def gc(self, older_than: float | None = None, dry_run: bool = False) -> GcReport:
        """Delete (or with dry_run count) finished tasks older than `older_than` seconds (default:
        the retention setting) and their rows; see sidequest.engine.retention."""
        self._require_running()
        return await self.retention.collect(older_than, dry_run=dry_run)
