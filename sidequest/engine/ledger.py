"""The workflow ledger: which workflows are open, how many of their tasks are unfinished, and
how their finished tasks ended, so that the engine knows without reading the store when a
workflow finishes and what its workflow_completed notification says.

It is kept in memory (the store is its durable copy, read back at start) and touched only on
the event loop.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from sidequest.engine.notifier import Notifier
from sidequest.models import NotificationKind, TaskStatus, WorkflowStatus
from sidequest.storage.base import WorkflowRecord

FINISHED = {s.value for s in (TaskStatus.completed, TaskStatus.failed, TaskStatus.cancelled)}


def finished_counts(counts: dict[str, int]) -> Counter[str]:
    return Counter({status: n for status, n in counts.items() if status in FINISHED})


class WorkflowLedger:
    """Open workflows, their open-task counts and their finished tasks' statuses."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self._workflows: dict[str, WorkflowRecord] = {}
        self._open: Counter[str] = Counter()
        self._counts: dict[str, Counter[str]] = {}

    def load(self, live_workflows: dict[str, WorkflowRecord], counts: dict[str, dict[str, int]]) -> None:
        """The open workflows and every workflow's task counts, as the store had them at start."""
        self._workflows = dict(live_workflows)
        for wid, by_status in counts.items():
            self._counts[wid] = finished_counts(by_status)
            self._open[wid] = sum(n for s, n in by_status.items() if s not in FINISHED)

    def __contains__(self, wid: str) -> bool:
        return wid in self._workflows

    def get(self, wid: str) -> WorkflowRecord | None:
        return self._workflows.get(wid)

    def opened(self, workflow: WorkflowRecord) -> None:
        """A new workflow, with no tasks counted yet."""
        self._workflows[workflow.id] = workflow
        self._counts[workflow.id] = Counter()

    def reopened(self, workflow: WorkflowRecord, counts: Counter[str], now: datetime) -> None:
        """A finished workflow running again (a task joined it or was retried); `counts` are its
        finished tasks as the store has them."""
        workflow.status, workflow.updated_at, workflow.finished_at = WorkflowStatus.running.value, now, None
        self._workflows[workflow.id] = workflow
        self._counts[workflow.id] = counts

    def task_added(self, wid: str) -> None:
        self._open[wid] += 1

    def uncount(self, wid: str, status: str) -> None:
        """A finished task of an open workflow is running again: it no longer counts as `status`."""
        self._counts.setdefault(wid, Counter())[status] -= 1

    def task_finished(self, wid: str, status: str, now: datetime, agent: str) -> None:
        self._counts.setdefault(wid, Counter())[status] += 1
        self._open[wid] -= 1
        if self._open[wid] <= 0:
            self.finish(wid, now, only_agent=agent)

    def finish_idle(self, now: datetime) -> None:
        """Finish the workflows left running with nothing open (a crash between writes)."""
        for wid in [w for w in self._workflows if self._open[w] <= 0]:
            self.finish(wid, now)

    def finish(self, wid: str, now: datetime, only_agent: str | None = None) -> None:
        """Emit workflow_completed, except for an unnamed one-task workflow.

        There the task's own notification already says everything; a second
        one would only cost the model tokens (and the store a row).
        """
        workflow = self._workflows.pop(wid, None)
        counts = self._counts.pop(wid, Counter())
        self._open.pop(wid, None)
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
