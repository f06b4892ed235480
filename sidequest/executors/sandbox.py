"""Fences for executors that start local processes: where they run, what they see, how they stop.

A model chooses the prompt and may suggest a working directory; it must not be
able to choose where code runs beyond what the user allowed, nor read the
server's secrets through the environment, nor leave processes running after
its task was cancelled. These helpers hold those three rules so every
process-starting executor applies them the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from sidequest.executors.base import PermanentError, TaskContext

if TYPE_CHECKING:
    import psutil
    from anyio.abc import ByteReceiveStream, Process

log = logging.getLogger(__name__)

STOP_GRACE = 2.0
"""Seconds between SIGTERM and SIGKILL: enough to flush a file, short enough for a cancel to feel done."""


def is_inside(path: str, root: str) -> bool:
    """For real paths: a prefix test on whole components (`/a/bc` is not inside `/a/b`)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_workdir(
    requested: str | Path | None,
    scope: str,
    roots: Sequence[str | Path],
    *,
    source: str = "options.cwd",
) -> Path:
    """The real directory to run in: `requested` (relative to the scope) or the scope itself.

    `roots` is the engine's `TaskContext.workdir_roots`: `allowed_roots`, plus
    the scope only when a client connected from it, so a scope a model typed
    (`/`) does not open the whole disk.

    Why realpath: a symlink or `..` inside an allowed folder must not lead out
    of it, so the check is made on the resolved path and the process starts in
    that resolved path (not the name, which could be swapped afterwards).
    """
    scope_dir = scope if scope and os.path.isabs(scope) and os.path.isdir(scope) else None
    real_roots = [os.path.realpath(root) for root in roots]
    if requested is None or str(requested) == "":
        if scope_dir is None:
            raise PermanentError(
                f"no working directory: the task's scope {scope!r} is not a directory, so give "
                "options.cwd inside allowed_roots (set allowed_roots in the sidequest config)"
            )
        chosen, source = scope_dir, "the task's scope"
    else:
        chosen = os.path.expanduser(str(requested))
        if "\0" in chosen:
            raise PermanentError(f"{source} contains a NUL character")
        if not os.path.isabs(chosen):
            if scope_dir is None:
                raise PermanentError(
                    f"relative cwd {chosen!r} needs a scope that is a directory; "
                    f"the task's scope is {scope!r}"
                )
            chosen = os.path.join(scope_dir, chosen)
    real = os.path.realpath(chosen)
    if not any(is_inside(real, root) for root in real_roots):
        shown = f"{chosen} (really {real})" if real != os.path.normpath(chosen) else chosen
        allowed = ", ".join(dict.fromkeys(real_roots)) or "none: the scope is not a project a client runs in"
        raise PermanentError(
            f"refused to run in {shown} ({source}): it is outside the allowed roots ({allowed}); "
            "add the folder to allowed_roots in the sidequest config to allow it"
        )
    if not os.path.isdir(real):
        raise PermanentError(f"working directory {chosen} ({source}) does not exist or is not a directory")
    return Path(real)


def child_env(allow: Iterable[str], fixed: Mapping[str, str]) -> dict[str, str]:
    """An environment from the server's own: only the allowlisted names, then the fixed values.

    Why an allowlist and not a blocklist: the server's environment holds API
    keys and tokens under names nobody can enumerate in advance; a child (and
    every tool it runs for a model) should see only what the user chose to
    pass. Fixed values win, so the config can pin a variable whatever the
    server was started with.
    """
    env = {name: os.environ[name] for name in allow if name in os.environ}
    env.update(fixed)
    return env


def _tree(pid: int) -> list[psutil.Process]:
    """The process and every descendant alive now (parents first)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _alive(proc: psutil.Process) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_all(procs: Iterable[psutil.Process], groups: Iterable[int], signum: int) -> None:
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signum)
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)


def _groups(procs: Iterable[psutil.Process]) -> set[int]:
    """Process groups of the tree other than ours (a shell tool runs each command in its own group)."""
    ours = os.getpgrp()
    found: set[int] = set()
    for proc in procs:
        try:
            group = os.getpgid(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
        if group != ours and group > 1:
            found.add(group)
    return found


async def end_process_tree(pid: int, grace: float = STOP_GRACE) -> list[int]:
    """SIGTERM a process, its descendants and their process groups; SIGKILL what is left after `grace`.

    Why the whole tree: a cancelled agent's tools (a build, a `sleep`, a
    server it started) are the agent's work too; ending only the top process
    orphans them, and they keep running with nobody to stop them. The tree is
    read before any signal, because a child whose parent died is re-parented
    and no longer found by walking down from the top. Its process groups are
    signalled too, which reaches background jobs (`cmd &`) whose shell has
    already exited. The caller's own group is never signalled.

    Does not reap: the caller (here, the SDK's transport) still waits for its
    own child, so the exit status is not stolen from it. Returns the pids that
    needed SIGKILL.
    """
    procs = _tree(pid)
    if not procs:
        return []
    groups = _groups(procs)
    _signal_all(procs, groups, signal.SIGTERM)
    deadline = anyio.current_time() + grace
    while any(_alive(p) for p in procs) and anyio.current_time() < deadline:
        await anyio.sleep(0.05)
        for proc in _tree(pid):  # children forked after the snapshot, while the tree was stopping
            if proc.pid not in {p.pid for p in procs}:
                procs.append(proc)
                new_groups = _groups([proc]) - groups
                groups |= new_groups
                _signal_all([proc], new_groups, signal.SIGTERM)
    survivors = [p for p in procs if _alive(p)]
    if survivors:
        log.warning("process tree of %d: SIGKILL to %s after %gs", pid, [p.pid for p in survivors], grace)
    _signal_all(survivors, groups, signal.SIGKILL)
    deadline = anyio.current_time() + 1.0  # SIGKILL cannot be refused, but takes a moment to land
    while any(_alive(p) for p in survivors) and anyio.current_time() < deadline:
        await anyio.sleep(0.02)
    return [p.pid for p in survivors]


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_alive(pgid: int) -> bool:
    """True while a process that is not a zombie is left in the group.

    Zombies count as gone: an orphaned grandchild is reparented to PID 1, and in
    containers PID 1 often never reaps, so a dead grandchild can stay a zombie
    (which signal 0 still finds) for as long as the container runs.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _has_live_member(pgid)


def _has_live_member(pgid: int) -> bool:
    """Scan /proc (Linux) for a member of the group that is not a zombie; elsewhere assume one."""
    if not os.path.exists("/proc/self/stat"):
        return True
    wanted = str(pgid).encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue
        # After "(comm)": state, ppid, pgrp.
        if len(fields) >= 3 and fields[2] == wanted and fields[0] != b"Z":
            return True
    return False


async def stop_process_group(process: Process, grace: float = STOP_GRACE) -> None:
    """SIGTERM the program's whole process group, SIGKILL it after `grace`, and reap the program.

    The group id is the program's pid (it was started in a new session). While
    the program is unreaped, or any member lives, that id cannot be reused, so
    the signals reach only processes this attempt started. Callers shield this
    from cancellation: it must finish even when the attempt is being cancelled.
    """
    pgid = process.pid
    if process.returncode is not None and not _group_alive(pgid):
        return
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (remaining := deadline - time.monotonic()) > 0:
        if process.returncode is None:
            with anyio.move_on_after(min(0.05, remaining)):
                await process.wait()
        elif not _group_alive(pgid):
            return
        else:
            await anyio.sleep(min(0.05, remaining))
    _signal_group(pgid, signal.SIGKILL)
    await process.wait()


def describe_exit(returncode: int, who: str) -> str:
    """`who exited with status N` or `who was killed by signal SIGKILL (9)`, from a returncode."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"{who} was killed by signal {name} ({-returncode})"
    return f"{who} exited with status {returncode}"


__all__ = [
    "STOP_GRACE",
    "child_env",
    "describe_exit",
    "end_process_tree",
    "resolve_workdir",
    "stop_process_group",
]


async def read_to_end(
    stream: ByteReceiveStream, feed: Callable[[bytes], None], done: anyio.Event, chunk: int = 65536
) -> None:
    """Hand every chunk to `feed` until the stream ends, however much the caller keeps: a child
    blocked on a full pipe would never exit. `done` is set when the stream is finished."""
    try:
        while True:
            feed(await stream.receive(chunk))
    except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass
    finally:
        done.set()


def task_env(ctx: TaskContext) -> dict[str, str]:
    """The ids every child process of a task gets (they win over the allowlist and fixed values)."""
    return {
        "SIDEQUEST_TASK_ID": ctx.task_id,
        "SIDEQUEST_WORKFLOW_ID": ctx.workflow_id,
        "SIDEQUEST_ATTEMPT": str(ctx.attempt),
        "SIDEQUEST_SCOPE": ctx.scope,
    }
