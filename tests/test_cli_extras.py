"""The command line's conveniences as a user meets them: `submit --wait` progress on a terminal,
`tasks --watch`, shell completion, "did you mean" for a typo, `--json` errors, and `schedule
--start-at` read as UTC.

Commands run as real processes (in a pseudo-terminal where a terminal is what matters) against one
real daemon for the module; the MCP checks call a real engine through the SDK's client.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import agents_toml
from mcp import Client
from test_cli import COMMAND_TIMEOUT, REPO, Cli, _alive, _daemon_pid, cli_session, only_line
from tools import call_error

from sidequest import __version__ as sidequest_version
from sidequest.cli_errors import ErrorDocument
from sidequest.cli_watch import FALLBACK_ENV
from sidequest.commands import TaskDetail
from sidequest.completion import SHELLS, describe
from sidequest.engine.engine import Engine
from sidequest.models import (
    ScheduleCreated,
    ScheduleInfo,
    TaskStatus,
    TaskSubmitted,
    WorkerInfo,
    WorkerList,
)
from sidequest.server.mcp import build_server
from sidequest.terminal import printable

pytestmark = pytest.mark.slow

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r")


ESCAPING_AGENT = (
    '[agents.escapes]\nexecutor = "command"\nargv = ["sh", "-c", "'
    "printf 'ok\\\\033[1A\\\\033[2K\\\\033]52;c;SGVsbG8=\\\\007' >&2; printf 'res\\\\033[2Jult'"
    '"]\n'
)
"""A command agent whose stderr erases the line above and writes the clipboard (OSC 52), and whose
result clears the screen."""
STDERR_ESCAPES = "ok\x1b[1A\x1b[2K\x1b]52;c;SGVsbG8=\x07"
RESULT_ESCAPES = "res\x1b[2Jult"
PROMPT_ESCAPES = "see \x1b]8;;https://evil.example\x07the docs\x1b]8;;\x07"
"""A prompt (a model writes those) with a disguised OSC 8 link."""


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    # The completion scripts call `sidequest` by name: this checkout's, first on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    config = "shutdown_grace = 1\nlease_seconds = 5\n\n" + agents_toml() + ESCAPING_AGENT
    with cli_session(tmp_path_factory.mktemp("cli-extras"), config, {"PATH": path}) as runner:
        yield runner


class Terminal:
    """`sidequest …` with stdout and stderr on a pseudo-terminal, as in an interactive shell."""

    def __init__(self, cli: Cli, project: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.master, slave = pty.openpty()
        env = {
            **cli.env,
            "CLAUDE_PROJECT_DIR": str(project),
            "COLUMNS": "160",
            "TERM": "xterm",
            **(env or {}),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidequest.cli", *args],
            env=env,
            cwd=project,
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
        )
        os.close(slave)
        self.raw = b""

    @property
    def screen(self) -> str:
        """What was written so far, without cursor movement and colour codes."""
        return _ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def read_until(self, found: Callable[[str], bool], what: str) -> str:
        """Reads until `found(screen)`; fails if the process ends (or goes quiet long) without it."""
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not found(self.screen):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} on the terminal:\n{self.screen}")
            if not self._read():
                raise AssertionError(f"the command ended without {what}:\n{self.screen}")
        return self.screen

    def finish(self) -> int:
        """Reads to the end of the output, then reaps the process."""
        while self._read():
            pass
        code = self.process.wait(timeout=COMMAND_TIMEOUT)
        os.close(self.master)
        return code

    def _read(self) -> bool:
        ready, _, _ = select.select([self.master], [], [], COMMAND_TIMEOUT)
        if not ready:  # a hung command fails the test instead of blocking it forever
            raise AssertionError(f"no output for {COMMAND_TIMEOUT:g}s:\n{self.screen}")
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            return False
        self.raw += chunk
        return bool(chunk)


NO_FALLBACK = {FALLBACK_ENV: "3600"}
"""The watchers' fallback re-reads an hour apart: what they show within a test came by the event stream."""


def _no_fallback(cli: Cli) -> Cli:
    return Cli(home=cli.home, env={**cli.env, **NO_FALLBACK}, projects=cli.projects)


def _json_error(stderr: str) -> ErrorDocument:
    """stderr under --json must be exactly one JSON object (nothing else on it)."""
    return ErrorDocument.model_validate_json(stderr.strip())


# ---- submit --wait --------------------------------------------------------------------------------


def test_submit_wait_on_a_terminal_shows_progress_then_the_result(cli: Cli) -> None:
    project = cli.project("wait-terminal")
    cli(project, "agents")  # the daemon is up before the clock of the sleep starts
    term = Terminal(cli, project, "submit", "sleep", "3", "--wait")
    assert term.finish() == 0
    screen = term.screen
    assert "attempt 1 of 4" in screen  # the status and attempt, drawn while it ran
    assert re.search(r"step \d+ of 10", screen), screen  # the agent's own progress message
    assert re.search(r"\b\d+%", screen), screen  # its percent
    assert screen.rstrip().endswith("slept 3")  # the bar is gone; the result is what stays


def test_submit_wait_piped_prints_only_the_result(cli: Cli) -> None:
    """With the fallback re-reads an hour apart, finishing within the command's patience shows that
    the event stream woke the wait."""
    project = cli.project("wait-piped")
    waited = _no_fallback(cli)(project, "submit", "sleep", "1", "--wait")
    assert waited.stdout == "slept 1\n"
    assert "attempt" not in waited.stderr and "%" not in waited.stderr


def test_ctrl_c_while_waiting_leaves_the_task_running(cli: Cli) -> None:
    project = cli.project("wait-interrupt")
    term = Terminal(cli, project, "submit", "sleep", "60", "--wait")
    screen = term.read_until(lambda s: "running · attempt 1" in s, "running task's progress bar")
    task_id = re.search(r"submitted (t_\S+)", screen)
    assert task_id is not None, screen
    term.process.send_signal(signal.SIGINT)
    assert term.finish() == 130
    assert f"stopped waiting; task {task_id[1]} goes on" in term.screen
    assert "Traceback" not in term.screen
    detail = TaskDetail.model_validate_json(cli(project, "show", task_id[1], "--json").stdout)
    assert detail.task.status == TaskStatus.running
    cli(project, "cancel", task_id[1])


# ---- agent text on the terminal -------------------------------------------------------------------


def test_escape_sequences_from_an_agent_reach_the_terminal_only_as_visible_text(cli: Cli) -> None:
    project = cli.project("escapes")
    waited = cli(project, "submit", "escapes", PROMPT_ESCAPES, "--wait")
    assert waited.stdout == "res␛[2Jult\n"
    exact = TaskDetail.model_validate_json(
        cli(project, "submit", "escapes", PROMPT_ESCAPES, "--wait", "--json").stdout
    )
    task_id = exact.task.task_id
    assert exact.result is not None and exact.result.content == RESULT_ESCAPES  # --json stays exact

    shown = cli(project, "show", task_id).stdout
    logs = cli(project, "logs", task_id).stdout
    notes = cli(project, "notifications", "--peek").stdout  # "completed: <the result's start>"
    for out in (waited.stdout, shown, logs, notes):
        assert "\x1b" not in out and "\x07" not in out, repr(out)
    assert "res␛[2Jult" in shown and "res␛[2Jult" in notes
    assert "see ␛]8;;https://evil.example\\athe docs" in shown  # the prompt row
    assert "ok␛[1A␛[2K␛]52;c;SGVsbG8=\\a" in logs

    shown_json = TaskDetail.model_validate_json(cli(project, "show", task_id, "--json").stdout)
    assert shown_json.task.prompt == PROMPT_ESCAPES
    log_json = json.loads(cli(project, "logs", task_id, "--json").stdout)
    assert any(STDERR_ESCAPES in event["message"] for event in log_json["events"]), log_json


def test_printable_shows_every_control_but_newline_and_tab() -> None:
    assert printable("a\tb\nc") == "a\tb\nc"
    assert printable("\x1b[2J\x07\r\x00\x7f\x9b\x85é␛") == "␛[2J\\a\\r\\x00\\x7f\\x9b\\x85é␛"


# ---- tasks --watch --------------------------------------------------------------------------------


def test_tasks_watch_draws_the_table_and_ends_cleanly_on_ctrl_c(cli: Cli) -> None:
    project = cli.project("watch")
    sleeping = TaskSubmitted.model_validate_json(cli(project, "submit", "sleep", "60", "--json").stdout)
    try:
        term = Terminal(cli, project, "tasks", "--watch", env=NO_FALLBACK)
        term.read_until(lambda s: sleeping.task_id in s and "Ctrl-C to stop" in s, "the task table")
        # A task submitted while watching shows up without restarting the watch, and (no fallback
        # redraw for an hour) because the event stream said so.
        later = TaskSubmitted.model_validate_json(cli(project, "submit", "sleep", "60", "--json").stdout)
        screen = term.read_until(lambda s: later.task_id in s, "the task submitted while watching")
        assert "TASK" in screen and "STATUS" in screen
        term.process.send_signal(signal.SIGINT)
        assert term.finish() == 0
        assert "Traceback" not in term.screen and "sidequest:" not in term.screen
    finally:
        cli(project, "cancel", sleeping.workflow_id)
    cli(project, "cancel", later.workflow_id)


def test_tasks_watch_ends_when_the_daemon_is_stopped_and_starts_none(tmp_path: Path) -> None:
    config = "shutdown_grace = 1\nlease_seconds = 5\n\n" + agents_toml()
    with cli_session(tmp_path, config) as cli:
        project = cli.project("watch-stop")
        cli(project, "agents")  # the daemon the watch attaches to
        first = _daemon_pid(cli.home)
        term = Terminal(cli, project, "tasks", "--watch", env=NO_FALLBACK)
        try:
            term.read_until(lambda s: "Ctrl-C to stop" in s, "the watch's first table")
            cli(project, "stop")
            screen = term.read_until(lambda s: "daemon stopped" in s, "the watch saying the daemon stopped")
            assert term.finish() == 1
        finally:
            if term.process.poll() is None:
                term.process.kill()
                term.process.wait()
        assert "sidequest: the sidequest daemon stopped, and the watch does not start it" in screen, screen
        assert "Traceback" not in term.screen
        now = _daemon_pid(cli.home)
        assert now is None or not _alive(now), f"a daemon (pid {now}) was started; the first was {first}"


def test_logs_follow_ends_when_the_daemon_is_stopped_and_starts_none(tmp_path: Path) -> None:
    config = "shutdown_grace = 1\nlease_seconds = 5\n\n" + agents_toml()
    with cli_session(tmp_path, config) as cli:
        project = cli.project("logs-stop")
        submitted = TaskSubmitted.model_validate_json(cli(project, "submit", "sleep", "30", "--json").stdout)
        first = _daemon_pid(cli.home)
        follow = subprocess.Popen(
            [sys.executable, "-m", "sidequest.cli", "logs", submitted.task_id, "--follow"],
            env={**cli.env, "CLAUDE_PROJECT_DIR": str(project)},
            cwd=project,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert follow.stdout is not None
            assert "attempt_started" in follow.stdout.readline()  # following the running task
            cli(project, "stop")
            _, err = follow.communicate(timeout=COMMAND_TIMEOUT)
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
        assert follow.returncode != 0 and "Traceback" not in err, err
        now = _daemon_pid(cli.home)
        assert now is None or not _alive(now), f"a daemon (pid {now}) was started; the first was {first}"


@pytest.mark.anyio
async def test_a_watchers_event_stream_finds_the_daemon_that_replaced_a_stopped_one(tmp_path: Path) -> None:
    """The client the watchers use, against real daemons: a stream lost with its daemon forgets that
    daemon's address, and the next stream reaches the new daemon (another port and token)."""
    import anyio

    from sidequest.config import load_settings
    from sidequest.server.daemon import open_client

    config = "shutdown_grace = 1\nlease_seconds = 5\n\n" + agents_toml()
    with cli_session(tmp_path, config) as cli:
        project = cli.project("restart")

        async def run(*args: str) -> None:
            await anyio.to_thread.run_sync(lambda: cli(project, *args))

        await run("agents")
        first = _daemon_pid(cli.home)
        settings = load_settings(Path(cli.env["SIDEQUEST_CONFIG"]), {"SIDEQUEST_HOME": str(cli.home)})
        async with open_client(settings, project=str(project)) as client:
            client.may_start = False

            async def drain() -> None:
                """Reopens the stream as a watcher does, until the client has given up the address
                (a stopping daemon closes its streams a moment before it stops answering)."""
                while client.endpoint is not None:
                    with contextlib.suppress(Exception):
                        async for _ in client.events():
                            pass
                    await anyio.sleep(0.1)

            with anyio.fail_after(COMMAND_TIMEOUT):  # a deadline for a hang, not a timing claim
                async with anyio.create_task_group() as tg:
                    tg.start_soon(drain)
                    await run("stop")
            assert client.endpoint is None  # the dead daemon's address is forgotten

            await run("agents")  # another command starts a new daemon
            second = _daemon_pid(cli.home)
            assert second is not None and second != first
            updates: list[dict[str, object]] = []

            async def follow() -> None:
                async for kind, data in client.events():
                    if kind == "update":
                        updates.append(data)
                        return

            with anyio.fail_after(COMMAND_TIMEOUT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(follow)
                    while not updates:  # submit until the stream, opened meanwhile, reports one
                        await run("submit", "echo", "x")
            assert client.endpoint is not None and client.endpoint.pid == second


def test_tasks_watch_refuses_json(cli: Cli) -> None:
    project = cli.project("watch-json")
    refused = cli(project, "tasks", "--watch", "--json", code=2)
    assert refused.stdout == ""
    error = _json_error(refused.stderr)
    assert error.error.code == "usage"
    assert "--watch" in error.error.message and "/api/v1/events" in error.error.message


# ---- completion -----------------------------------------------------------------------------------


def _bash_complete(cli: Cli, project: Path, *words: str) -> list[str]:
    """What bash offers for the last word, with the script sourced as a user's .bashrc would."""
    script = cli(project, "completion", "bash").stdout
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in ["sidequest", *words])
    program = (
        f"{script}\n"
        f"COMP_WORDS=({quoted}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); COMPREPLY=()\n"
        "_sidequest\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        env={**cli.env, "CLAUDE_PROJECT_DIR": str(project)},
        cwd=project,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=True,
    )
    return done.stdout.split()


def test_bash_completion_completes_commands_options_choices_and_agents(cli: Cli) -> None:
    project = cli.project("completion")
    assert _bash_complete(cli, project, "sub") == ["submit"]
    assert sorted(_bash_complete(cli, project, "sched")) == ["schedule", "schedule-show", "schedules"]
    assert _bash_complete(cli, project, "tasks", "--w") == ["--watch"]
    assert _bash_complete(cli, project, "schedule", "echo", "x", "--overlap", "") == [
        "skip",
        "queue",
        "allow",
    ]
    assert _bash_complete(cli, project, "env", "") == ["set", "unset", "list"]
    assert _bash_complete(cli, project, "completion", "") == list(SHELLS)
    # AGENT comes from `sidequest agents --json`, in this project, past options given first.
    assert _bash_complete(cli, project, "submit", "--wait", "echo") == ["echo", "echo_sync"]


def test_zsh_and_fish_scripts_cover_every_command() -> None:
    """Produced without the shells: what can be checked whether or not zsh and fish are installed."""
    from sidequest.cli import _parser

    commands = sorted(describe(_parser()).subcommands)
    for shell in ("zsh", "fish"):
        done = subprocess.run(
            [sys.executable, "-m", "sidequest.cli", "completion", shell],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for command in commands:
            assert command in done.stdout, f"{shell} script lacks {command}"
    fish = subprocess.run(
        [sys.executable, "-m", "sidequest.cli", "completion", "fish"], capture_output=True, text=True
    ).stdout
    assert "complete -c sidequest -n __sidequest_path -a submit" in fish
    assert "complete -c sidequest -n '__sidequest_path env' -a set" in fish
    assert "-l watch" in fish and "-x -a 'skip queue allow'" in fish


def _script(shell: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "sidequest.cli", "completion", shell],
        capture_output=True,
        text=True,
        check=True,
        timeout=COMMAND_TIMEOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout


def _shell(name: str) -> str:
    found = shutil.which(name)
    assert found is not None, f"{name} is not installed: `make shells` installs it (make test does)"
    return found


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_scripts_parse(shell: str) -> None:
    found = _shell(shell)
    check = [found, "-n"] if shell == "zsh" else [found, "--no-execute"]
    done = subprocess.run(
        check, input=_script(shell), capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    )
    assert done.returncode == 0, done.stderr


def test_fish_completes_commands_and_choices(tmp_path: Path) -> None:
    fish = _shell("fish")
    script = tmp_path / "sidequest.fish"
    script.write_text(_script("fish"))
    program = (
        f"source {script}; function sidequest; end; "  # completion asks for a command by that name
        'complete -C "sidequest su"; complete -C "sidequest schedule echo x --overlap "'
    )
    done = subprocess.run([fish, "-c", program], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    offered = [line.split("\t")[0] for line in done.stdout.splitlines()]
    assert offered == ["submit", "allow", "queue", "skip"], done.stdout + done.stderr


def test_zsh_driver_offers_the_words_of_its_position(tmp_path: Path) -> None:
    """The zsh driver outside a completion widget: compadd and compdef stubbed to print what they get
    (zsh's own completion system then filters by the prefix typed)."""
    zsh = _shell("zsh")
    script = tmp_path / "_sidequest"
    script.write_text(_script("zsh"))
    program = (
        'compdef() { : }; compadd() { shift; print -r -- "$@" }; _files() { print FILES }\n'
        f"source {script}\n"
        'words=(sidequest env ""); CURRENT=3; _sidequest\n'
        'words=(sidequest schedule echo x --overlap ""); CURRENT=6; _sidequest\n'
        'words=(sidequest submit --config ""); CURRENT=4; _sidequest\n'
    )
    done = subprocess.run([zsh, "-f", "-c", program], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert done.stdout.splitlines() == ["set unset list", "skip queue allow", "FILES"], done.stderr


def test_unknown_shell_is_a_usage_error(cli: Cli) -> None:
    refused = cli(cli.project("completion-bad"), "completion", "bsh", code=2)
    assert "invalid choice: 'bsh'; did you mean 'bash'" in refused.stderr


# ---- did you mean ---------------------------------------------------------------------------------


def test_mistyped_agent_and_command_get_a_suggestion(cli: Cli) -> None:
    project = cli.project("typo")
    agent = cli(project, "submit", "ecoh", "hi", code=1)
    line = [x for x in agent.stderr.splitlines() if x.startswith("sidequest: ")][-1]
    assert line.startswith("sidequest: no agent named 'ecoh'; did you mean 'echo'")
    assert "known agents: bad_unicode, big_result, cites_badly, echo," in line
    command = cli(project, "sumbit", "echo", "hi", code=2)
    assert "invalid choice: 'sumbit'; did you mean 'submit'?" in command.stderr
    assert cli(project, "tasks", "--json").stdout.count('"task_id"') == 0  # nothing was submitted


@pytest.mark.anyio
async def test_mistyped_agent_and_tool_get_a_suggestion_over_mcp(engine: Engine) -> None:
    async with Client(build_server(engine, "/projects/typo")) as client:
        agent = await call_error(client, "task_async", agent_definition="ecoh", prompt="hi")
        assert "no agent named 'ecoh'; did you mean 'echo'" in agent
        tool = await client.call_tool("task_asnyc", {"agent_definition": "echo", "prompt": "hi"})
        assert tool.is_error
        text = tool.content[0].text  # type: ignore[union-attr]
        assert "Unknown tool: task_asnyc; did you mean 'task_async'?" in text
        assert "list_agents" in text  # the tools it does have
        unrelated = await client.call_tool("zzzz", {})
        assert "did you mean" not in unrelated.content[0].text  # type: ignore[union-attr]


# ---- --json errors ----------------------------------------------------------------------------------


def test_json_errors_are_one_object_on_stderr(cli: Cli) -> None:
    project = cli.project("json-errors")
    cli(project, "agents")  # the daemon runs: no start-up lines on stderr below
    missing = cli(project, "show", "t_nope", "--json", code=1)
    assert missing.stdout == ""
    error = _json_error(missing.stderr)
    assert error.error.code == "not_found" and "t_nope" in error.error.message

    agent = cli(project, "submit", "ecoh", "hi", "--json", code=1)
    assert agent.stdout == "" and _json_error(agent.stderr).error.code == "invalid_request"

    option = cli(project, "submit", "echo", "hi", "--option", "priorty=high", "--json", code=2)
    assert option.stdout == ""
    assert _json_error(option.stderr).error.code == "usage"

    for usage in (["tasks", "--limit", "0", "--json"], ["sumbit", "--json"], ["show", "--json"]):
        refused = cli(project, *usage, code=2)
        assert refused.stdout == ""
        error = _json_error(refused.stderr)
        assert error.error.code == "usage"
    assert (
        "did you mean 'submit'" in _json_error(cli(project, "sumbit", "--json", code=2).stderr).error.message
    )


# ---- schedule --start-at --------------------------------------------------------------------------


def test_schedule_start_at_without_a_zone_is_utc(cli: Cli) -> None:
    project = cli.project("start-at")
    created = ScheduleCreated.model_validate_json(
        cli(
            project,
            "schedule",
            "echo",
            "x",
            "--cron",
            "0 9 * * *",
            "--tz",
            "Europe/Berlin",
            "--start-at",
            "2030-01-31T09:00",
            "--end-at",
            "2030-02-28T09:00:00+01:00",
            "--json",
        ).stdout
    )
    shown = cli(project, "schedule-show", created.schedule_id, "--json").stdout
    schedule = ScheduleInfo.model_validate(json.loads(shown)["schedule"])
    assert schedule.start_at == datetime(2030, 1, 31, 9, 0, tzinfo=UTC)  # not 09:00 in Berlin
    assert schedule.end_at == datetime(2030, 2, 28, 8, 0, tzinfo=UTC)  # a zone given is kept
    assert created.next_runs[0] == datetime(2030, 2, 1, 8, 0, tzinfo=UTC)  # 09:00 Berlin, after 09:00Z
    cli(project, "unschedule", created.schedule_id)


# ---- the shared-store commands: migrate, worker, serve --no-work, workers -------------------------

PG_SECRET = "hunter2-Secret"


def test_migrate_brings_a_duckdb_store_up_to_date_once(tmp_path: Path) -> None:
    from sidequest.storage.duckdb import migrations
    from sidequest.workers_cli import MigrateResult

    newest = migrations()[-1][0]
    with cli_session(tmp_path, "") as cli:
        project = cli.project("migrate")
        store = cli.home / "sidequest.duckdb"
        first = cli(project, "migrate")
        assert first.stdout.strip() == f"{store}: schema version 0 -> {newest}"
        again = cli(project, "migrate")
        assert again.stdout.strip() == f"{store}: already at version {newest}"
        result = MigrateResult.model_validate_json(cli(project, "migrate", "--json").stdout)
        assert result == MigrateResult(
            store="duckdb", database=str(store), from_version=newest, to_version=newest
        )
        assert store.stat().st_mode & 0o077 == 0  # private, as the daemon makes it
        # The daemon owns the file while it runs: migrate says so in one line and changes nothing.
        cli(project, "agents")
        held = cli(project, "migrate", code=1)
        assert held.stdout == "" and "in use by another process" in only_line(held.stderr)
        refused = _json_error(cli(project, "migrate", "--json", code=1).stderr)
        assert refused.error.code == "store" and "in use" in refused.error.message


def test_worker_and_serve_no_work_are_refused_on_duckdb(cli: Cli) -> None:
    from sidequest.workers_cli import NO_WORK_NOT_SHARED, NOT_SHARED

    project = cli.project("worker-duckdb")
    refused = cli(project, "worker", "--concurrency", "2", "--queue", "gpu", code=2)
    assert only_line(refused.stderr) == f"sidequest: {NOT_SHARED}"
    assert 'database = "postgresql://…"' in NOT_SHARED and "the daemon runs the work itself" in NOT_SHARED
    no_work = cli(project, "serve", "--no-work", code=2)
    assert only_line(no_work.stderr) == f"sidequest: {NO_WORK_NOT_SHARED}"
    detached = cli(project, "serve", "--no-work", "--detach", code=2)
    assert only_line(detached.stderr) == f"sidequest: {NO_WORK_NOT_SHARED}"


def test_worker_options_are_checked_before_anything_starts(cli: Cli) -> None:
    project = cli.project("worker-usage")
    bad_queue = cli(project, "worker", "--queue", "two words", code=2)
    assert "not a queue name" in bad_queue.stderr
    bad_concurrency = cli(project, "worker", "--concurrency", "0", code=2)
    assert "--concurrency" in bad_concurrency.stderr


def test_a_bad_or_unreachable_dsn_is_one_line_without_the_password(tmp_path: Path) -> None:
    with cli_session(tmp_path, "") as cli:
        project = cli.project("dsn")
        env = {**cli.env, "SIDEQUEST_DATABASE": f"postgresql://sq:{PG_SECRET}@/sidequest"}
        for command in (["migrate"], ["worker"], ["serve"], ["migrate", "--json"]):
            bad = Cli(home=cli.home, env=env, projects=cli.projects)(project, *command, code=2)
            assert PG_SECRET not in bad.stderr and "Traceback" not in bad.stderr
            assert "'database'" in bad.stderr and "no host" in bad.stderr
        # Port 1 on this machine: nothing listens there, so the connection is refused.
        env["SIDEQUEST_DATABASE"] = f"postgresql://sq:{PG_SECRET}@127.0.0.1:1/sidequest?connect_timeout=5"
        unreachable = Cli(home=cli.home, env=env, projects=cli.projects)(project, "migrate", code=1)
        assert PG_SECRET not in unreachable.stderr and "Traceback" not in unreachable.stderr
        assert only_line(unreachable.stderr).startswith("sidequest: cannot migrate: ")
        as_json = Cli(home=cli.home, env=env, projects=cli.projects)(project, "migrate", "--json", code=1)
        assert _json_error(as_json.stderr).error.code == "store" and PG_SECRET not in as_json.stderr


def test_completion_knows_the_shared_store_commands(cli: Cli) -> None:
    project = cli.project("completion-ops")
    assert sorted(_bash_complete(cli, project, "work")) == ["worker", "workers"]
    assert _bash_complete(cli, project, "mig") == ["migrate"]
    assert sorted(_bash_complete(cli, project, "worker", "--")) == [
        "--concurrency",
        "--config",
        "--help",
        "--queue",
    ]
    assert "--no-work" in _bash_complete(cli, project, "serve", "--no")


def _worker(n: int, kind: str, alive: bool, running: int, concurrency: int) -> WorkerInfo:
    now = datetime.now(UTC)
    return WorkerInfo(
        id=f"w_{n}",
        host="box",
        pid=100 + n,
        kind=kind,  # type: ignore[arg-type]
        queues=["default"],
        concurrency=concurrency,
        running=running,
        started_at=now,
        heartbeat_at=now,
        alive=alive,
    )


def test_status_sums_the_workers_up_in_one_line() -> None:
    from sidequest.workers_cli import workers_summary

    assert workers_summary(WorkerList(workers=[])) == "none"
    fleet = WorkerList(
        workers=[
            _worker(1, "daemon", True, 1, 4),
            _worker(2, "worker", True, 2, 8),
            _worker(3, "worker", True, 0, 8),
            _worker(4, "worker", False, 0, 8),
        ]
    )
    assert workers_summary(fleet) == "3 alive (1 daemon, 2 workers), running 3/20, 1 gone"
    gone = WorkerList(workers=[_worker(4, "worker", False, 0, 8)])
    assert workers_summary(gone).startswith("none alive")


def test_doctor_shows_a_postgres_store_by_its_redacted_dsn(tmp_path: Path) -> None:
    from sidequest.config import load_settings
    from sidequest.doctor import checks
    from sidequest.models import AgentList, DaemonStatus

    shown = "postgresql://sq:***@db.example/sidequest"
    status = DaemonStatus(
        version=sidequest_version,
        pid=1,
        host="127.0.0.1",
        port=1,
        started_at=datetime.now(UTC),
        uptime_seconds=1.0,
        data_dir=str(tmp_path),
        database=shown,
        tasks={"queued": 2},
        running=0,
        schema_version=None,
    )
    found = checks(load_settings(env={"SIDEQUEST_HOME": str(tmp_path)}), "/p", status, AgentList(agents=[]))
    store = next(check for check in found if check.name == "store")
    assert store.status == "ok" and store.detail == f"{shown}; readable (2 tasks)"
