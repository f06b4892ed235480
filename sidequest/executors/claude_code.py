"""The `claude-code` executor: an agent file run as a headless Claude Code session.

Claude Code (the CLI bundled with claude-agent-sdk) brings the local tools an
API call lacks: it reads and edits files, runs commands, searches the tree.
So this is the executor for agents that work *in* a project. That power is
fenced here:

- **Where:** the session runs in the task's project or `options.cwd`, which
  must resolve inside the project or `allowed_roots` (see `sandbox`).
- **What it sees:** the SDK starts the CLI with the server's *whole*
  environment plus ours, so the CLI is started through `env -u NAME …`,
  which removes every variable not on `claude_code.env_allow`; the API key
  and base URL are handed over explicitly. A model's `Bash` tool therefore
  cannot print the server's other secrets (the API key itself does reach
  the CLI's tools; see CLI_DEFAULT_ENV).
- **Which tools:** an agent file's `tools` are both the tools the session has
  and the ones pre-approved; anything else needs a permission the headless
  session cannot ask for (permission mode from the file or the config, never
  `bypassPermissions` unless the config says so).
- **Stopping:** cancel and timeout end the CLI *and everything it started*
  (a `sleep`, a dev server) at once, instead of the SDK's ~5 s wait followed
  by a signal to the CLI alone, which would orphan its tools' processes.

Sessions are durable: the session id is saved with the task as soon as the
CLI announces it, so a retry continues the conversation and another task can
fork it with `options.resume_task_id`.

Retries belong to the engine: the CLI retries an API call at most once
(`CLAUDE_CODE_MAX_RETRIES`, overridable in `claude_code.env`), then 429/5xx
become RetryableError and other API errors fail the task with the API's text.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from sidequest.agent_definition import AgentDefinition
from sidequest.config import Settings
from sidequest.executors.anthropic import RETRYABLE_STATUS, missing_key_warning, require_api_key
from sidequest.executors.base import (
    ExecutionResult,
    PermanentError,
    ReportedUsage,
    RetryableError,
    TaskContext,
)
from sidequest.executors.sandbox import child_env, end_process_tree, resolve_workdir

if TYPE_CHECKING:
    from claude_agent_sdk import ClaudeAgentOptions, ResultMessage

log = logging.getLogger(__name__)

PERMISSION_MODES = ("default", "acceptEdits", "plan", "dontAsk", "auto", "bypassPermissions")
CLI_DEFAULT_ENV = {"CLAUDE_CODE_MAX_RETRIES": "1"}
"""Under the allowlist and `claude_code.env`: the engine owns retries, with a cap and a history.

The CLI passes ANTHROPIC_API_KEY on to its tools' processes. Where bubblewrap
is installed, `CLAUDE_CODE_SUBPROCESS_ENV_SCRUB = "1"` in `claude_code.env`
hides it from them too; it is not a default because without bubblewrap the
CLI refuses to start."""
ENV_PROGRAM = shutil.which("env") or "/usr/bin/env"
SDK_MANAGED_ENV = {
    "CLAUDE_CODE_ENTRYPOINT",
    "CLAUDE_AGENT_SDK_VERSION",
    "CLAUDE_AGENT_SDK_DERIVED_CLIENT_APP",
    "CLAUDE_CODE_SDK_READS_SESSION_STATE",
    "CLAUDE_CODE_ENABLE_SDK_FILE_CHECKPOINTING",
    "PWD",
}
"""Variables the SDK sets for the CLI itself, whatever the server has: `env -u` must not remove its values.
(A server started by Claude Code inherits e.g. CLAUDE_CODE_ENTRYPOINT=cli; the SDK overrides it.)"""
STDERR_LINES = 20
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
"""The SDK refuses one stdout message over its buffer (1 MB by default); a big tool result can be larger."""
_NO_SESSION = "No conversation found"


@dataclass
class _Failure:
    """What a failed run reported, from a ResultMessage or from the SDK's ResultError."""

    subtype: str | None
    api_error_status: int | None
    text: str


class _Run:
    """State of one CLI run, shared between the task that reads it and the one that may cancel it."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.hidden: list[str] = []
        """Names of the server's environment the CLI must not inherit."""
        self.stopping = False
        """Set on cancel: the transport then ends the process tree instead of waiting for the CLI."""
        self.tree_ended = False
        self.result: ResultMessage | None = None
        self.session_id: str | None = None
        self.turns = 0
        self.message_id: str | None = None
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)

    def stderr_tail(self) -> str:
        return " | ".join(self.stderr)

    async def end_tree(self) -> None:
        """End the CLI and everything it started, once (shielded: this runs while being cancelled)."""
        if self.pid is not None and not self.tree_ended:
            self.tree_ended = True
            with anyio.CancelScope(shield=True):
                await end_process_tree(self.pid)


def _transport_class() -> type:
    """The SDK's own subprocess transport, remembering the CLI's pid (imported late: the SDK is optional).

    Why a subclass and not the default transport: only the transport knows the
    process, and `query()` gives no other way to reach it. Passing a transport
    skips two things in `query()`: store-backed session resume (`session_store`,
    unused here) and the copy of the options made for a `can_use_tool`
    callback (unused here); every CLI flag is still built from the options by
    the transport itself.

    The command is prefixed with `env -u NAME …` for every variable of the
    server's environment that is not allowed: the SDK always merges
    `os.environ` into the CLI's environment, and setting those variables to ""
    instead is not the same as unsetting them (an empty `CLAUDE_CONFIG_DIR`
    makes the CLI write its config into the working directory). `env` execs
    the CLI, so the pid stays the CLI's; only names, never values, are on
    that command line.

    On cancel, `close()` ends the process tree first. The SDK calls it after it
    has stopped reading the CLI's output, so the CLI's exit is not reported as
    a "fatal error in message reader", and the SDK's own close then finds the
    process gone instead of waiting ~5 s for it.
    """
    from claude_agent_sdk._internal.transport.subprocess_cli import SubprocessCLITransport

    class TrackedTransport(SubprocessCLITransport):
        run: _Run | None = None

        async def connect(self) -> None:
            await super().connect()
            process = getattr(self, "_process", None)
            if self.run is not None and process is not None:
                self.run.pid = process.pid

        def _build_command(self) -> list[str]:
            command: list[str] = super()._build_command()
            if self.run is None or not self.run.hidden:
                return command
            unset = [part for name in self.run.hidden for part in ("-u", name)]
            return [ENV_PROGRAM, *unset, "--", *command]

        async def close(self) -> None:
            if self.run is not None and self.run.stopping:
                await self.run.end_tree()
            await super().close()

    return TrackedTransport


class ClaudeCodeExecutor:
    name = "claude-code"

    def __init__(self, definition: AgentDefinition, settings: Settings) -> None:
        self.definition = definition
        self.settings = settings
        self.model = settings.model_id(definition.model)
        self.permission_mode = definition.permission_mode or settings.claude_code.permission_mode
        self.warnings: list[str] = []
        if self.permission_mode not in PERMISSION_MODES:
            self.warnings.append(
                f"permissionMode {self.permission_mode!r} is not one Claude Code knows "
                f"({', '.join(PERMISSION_MODES[:-1])}); tasks of this agent will fail"
            )

    # ---- checks ------------------------------------------------------------

    def preflight(self, options: Any, scope: str, workdir_roots: list[str] | None = None) -> list[str]:
        """At submit time: say now what would make the attempt fail (no key, no SDK, a refused cwd)."""
        warnings: list[str] = []
        missing_key = missing_key_warning(self.settings, self.definition.name)
        if missing_key:
            warnings.append(missing_key)
        try:
            import claude_agent_sdk  # noqa: F401
        except ImportError:
            warnings.append("claude-agent-sdk is not installed: pip install 'sidequest[claude-code]'")
        if workdir_roots is not None:
            try:
                resolve_workdir(getattr(options, "cwd", None), scope, workdir_roots)
            except PermanentError as exc:
                warnings.append(f"this task will fail: {exc}")
        return warnings

    # ---- run ---------------------------------------------------------------

    async def run(self, prompt: str, ctx: TaskContext) -> ExecutionResult:
        api_key = require_api_key(self.settings)
        if self.permission_mode not in PERMISSION_MODES:
            raise PermanentError(f"{self.definition.source}: {self.warnings[0]}")
        try:
            import claude_agent_sdk  # noqa: F401
        except ImportError as exc:
            raise PermanentError(
                "the claude-code executor needs claude-agent-sdk: pip install 'sidequest[claude-code]'"
            ) from exc
        cwd = resolve_workdir(ctx.options.get("cwd"), ctx.scope, ctx.workdir_roots)
        env, hidden = self._environment(api_key)
        if ctx.session_id:  # an earlier attempt of this task: continue its conversation
            plans = [(ctx.session_id, False)]
            # If that attempt died before its session reached disk, start again as a first attempt would.
            plans.append((ctx.resume_session_id, True) if ctx.resume_session_id else (None, False))
        elif ctx.resume_session_id:  # another task's session: branch off it, leaving it intact
            plans = [(ctx.resume_session_id, True)]
        else:
            plans = [(None, False)]
        for number, (resume, fork) in enumerate(plans, 1):
            try:
                return await self._run_once(prompt, ctx, cwd, env, hidden, resume, fork)
            except _SessionMissing:
                if number == len(plans):
                    raise PermanentError(self._missing_session_text(resume, ctx)) from None
                log.info("task %s: session %s not found; starting a new one", ctx.task_id, resume)
        raise AssertionError("unreachable")

    def _missing_session_text(self, session_id: str | None, ctx: TaskContext) -> str:
        task = ctx.options.get("resume_task_id") or ctx.task_id
        return (
            f"Claude Code has no session {session_id} (of task {task}) to resume. Sessions are files in the "
            "CLI's config dir ($CLAUDE_CONFIG_DIR, else ~/.claude): the task that created it must have run "
            "with the same HOME / CLAUDE_CONFIG_DIR, and the session must not have been deleted since"
        )

    def _environment(self, api_key: str) -> tuple[dict[str, str], list[str]]:
        """The CLI's environment (allowlist + fixed values + key + base URL) and the names to remove.

        The SDK merges `os.environ` under what we pass, so "not passing" a
        variable is not enough: every other name the server has is removed
        when the CLI starts (see the transport).
        """
        cfg = self.settings.claude_code
        env = dict(CLI_DEFAULT_ENV)
        env.update(child_env(cfg.env_allow, cfg.env))
        env["ANTHROPIC_API_KEY"] = api_key
        base_url = (
            self.settings.anthropic.base_url
            or cfg.env.get("ANTHROPIC_BASE_URL")
            or os.environ.get("ANTHROPIC_BASE_URL")
        )
        if base_url:
            env["ANTHROPIC_BASE_URL"] = base_url
        hidden = sorted(name for name in os.environ if name not in env and name not in SDK_MANAGED_ENV)
        return env, hidden

    def _options(
        self, ctx: TaskContext, cwd: Path, env: dict[str, str], resume: str | None, fork: bool, run: _Run
    ) -> ClaudeAgentOptions:
        from claude_agent_sdk import ClaudeAgentOptions

        definition = self.definition
        system_prompt: dict[str, str] = {"type": "preset", "preset": "claude_code"}
        if definition.system_prompt:
            system_prompt["append"] = definition.system_prompt
        budget = (
            ctx.options.get("max_budget_usd")
            or definition.keys.max_budget_usd
            or self.settings.claude_code.max_budget_usd
        )
        return ClaudeAgentOptions(
            system_prompt=system_prompt,  # type: ignore[arg-type]
            model=self.model,
            tools=list(definition.tools) if definition.tools is not None else None,
            allowed_tools=list(definition.tools or []),
            disallowed_tools=list(definition.disallowed_tools or []),
            max_turns=definition.max_turns,
            max_budget_usd=budget,
            permission_mode=self.permission_mode,  # type: ignore[arg-type]
            cwd=cwd,
            cli_path=self.settings.claude_code.cli_path,
            env=env,
            resume=resume,
            fork_session=fork,
            stderr=run.stderr.append,
            max_buffer_size=MAX_MESSAGE_BYTES,
        )

    async def _run_once(
        self,
        prompt: str,
        ctx: TaskContext,
        cwd: Path,
        env: dict[str, str],
        hidden: list[str],
        resume: str | None,
        fork: bool,
    ) -> ExecutionResult:
        """One CLI run, read in a shielded task so that a cancel ends the process tree, not just the CLI.

        Why the extra task: a cancellation delivered straight into the SDK's
        generator runs its cleanup, which waits ~5 s for the CLI and then
        signals only the CLI. Here the reader is shielded; this task receives
        the cancel, marks the run as stopping and cancels the reader itself,
        whose cleanup (the transport's `close`) then ends the whole tree.
        """
        run = _Run()
        run.hidden = hidden
        options = self._options(ctx, cwd, env, resume, fork, run)
        reader = anyio.CancelScope(shield=True)
        finished = anyio.Event()
        outcome: list[ExecutionResult | BaseException] = []

        async def read() -> None:
            try:
                with reader:
                    outcome.append(await self._read(prompt, options, ctx, run, resumed=resume is not None))
            except Exception as exc:
                outcome.append(exc)
            finally:
                finished.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            try:
                await finished.wait()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    run.stopping = True
                    reader.cancel()  # the SDK stops reading, then closes the transport, which ends the tree
                    with anyio.move_on_after(1):
                        await finished.wait()
                    await run.end_tree()  # in case the reader was stuck short of closing the transport
                    with anyio.move_on_after(15):
                        await finished.wait()
                raise
        if not outcome:
            raise RuntimeError("the Claude Code reader stopped without an outcome")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    async def _read(
        self, prompt: str, options: ClaudeAgentOptions, ctx: TaskContext, run: _Run, resumed: bool
    ) -> ExecutionResult:
        from claude_agent_sdk import (
            AssistantMessage,
            ClaudeSDKError,
            CLIConnectionError,
            CLINotFoundError,
            ResultError,
            ResultMessage,
            SystemMessage,
            query,
        )

        transport = _transport_class()(prompt=prompt, options=options)
        transport.run = run
        messages = query(prompt=prompt, options=options, transport=transport)
        failure: _Failure | None = None
        try:
            async for message in messages:
                _log_message(message, ctx)
                if isinstance(message, SystemMessage):
                    if message.subtype == "init":
                        self._note_session(message.data.get("session_id"), ctx, run)
                elif isinstance(message, AssistantMessage):
                    self._note_session(message.session_id, ctx, run)
                    if message.parent_tool_use_id is None:
                        self._report_turn(message, ctx, run)
                elif isinstance(message, ResultMessage):
                    self._note_session(message.session_id, ctx, run)
                    run.result = message
        except ResultError as exc:  # the CLI reported an error result, then exited non-zero
            if run.result is None or not run.result.is_error:
                text = exc.result or "; ".join(exc.errors) or str(exc)
                failure = _Failure(exc.subtype, exc.api_error_status, text)
        except CLINotFoundError as exc:
            where = self.settings.claude_code.cli_path or "the CLI bundled with claude-agent-sdk"
            raise PermanentError(
                f"Claude Code CLI not found ({where}): {exc}. Install sidequest[claude-code] or set "
                "claude_code.cli_path in the config"
            ) from exc
        except CLIConnectionError as exc:
            raise Exception(f"cannot start or talk to Claude Code: {exc}{self._stderr(run)}") from exc
        except ClaudeSDKError as exc:
            if run.result is None:
                raise Exception(f"Claude Code failed: {exc}{self._stderr(run)}") from exc
            log.warning("task %s: Claude Code ended with %s after its result", ctx.task_id, exc)
        finally:
            with anyio.CancelScope(shield=True):
                await messages.aclose()

        final = run.result
        if final is not None:
            self._record_usage(final, ctx, resumed)
            if final.is_error:
                failure = _Failure(final.subtype, final.api_error_status, _result_text(final))
        if failure is not None:
            raise self._translate(failure, options)
        if final is None:
            raise Exception(f"Claude Code ended without a result{self._stderr(run)}")
        return ExecutionResult(final.result or "")

    # ---- helpers -----------------------------------------------------------

    def _note_session(self, session_id: Any, ctx: TaskContext, run: _Run) -> None:
        """Save the id the moment it is known: a crash one second later can still be resumed."""
        if isinstance(session_id, str) and session_id and session_id != run.session_id:
            run.session_id = session_id
            ctx.save_state(session_id=session_id)

    def _report_turn(self, message: Any, ctx: TaskContext, run: _Run) -> None:
        from claude_agent_sdk import TextBlock, ToolUseBlock

        if message.message_id is None or message.message_id != run.message_id:
            run.turns += 1
            run.message_id = message.message_id
        text = " ".join(" ".join(b.text.split()) for b in message.content if isinstance(b, TextBlock)).strip()
        tools = [b.name for b in message.content if isinstance(b, ToolUseBlock)]
        if text:
            summary = text[:200]
        elif tools:
            summary = "tools: " + ", ".join(tools)
        else:
            return
        ctx.report_progress(None, f"turn {run.turns}: {summary}")

    def _stderr(self, run: _Run) -> str:
        tail = run.stderr_tail()
        return f" (CLI stderr: {tail})" if tail else ""

    def _translate(self, failure: _Failure, options: ClaudeAgentOptions) -> Exception:
        text = failure.text or failure.subtype or "unknown error"
        if failure.subtype == "error_max_turns":
            return PermanentError(
                f"the agent used all {options.max_turns} turns (maxTurns in {self.definition.source}) "
                f"without finishing; raise maxTurns or narrow the prompt ({text})"
            )
        if failure.subtype == "error_max_budget_usd":
            return PermanentError(
                f"the task reached its spending cap of ${options.max_budget_usd:g} and was stopped; raise "
                "options.max_budget_usd, sidequest.max_budget_usd in the agent file or "
                f"claude_code.max_budget_usd in the config ({text})"
            )
        if _NO_SESSION in text:
            return _SessionMissing(text)
        status = failure.api_error_status
        if status is not None:
            message = f"Anthropic API error {status} (through Claude Code): {text}"
            if status in RETRYABLE_STATUS:
                return RetryableError(message)
            if status == 401:
                message += f" — check {self.settings.anthropic.api_key_env}"
            return PermanentError(message)
        return Exception(f"Claude Code failed ({failure.subtype}): {text}")

    def _record_usage(self, result: ResultMessage, ctx: TaskContext, resumed: bool) -> None:
        """One record per attempt from the final result.

        The CLI's `total_cost_usd` is what it enforces the budget with, so it
        is the cost recorded. A resumed session reports the *whole
        session's* cost, earlier runs included (already recorded with their
        own tasks), while `usage` counts only this run's tokens: then the cost
        comes from the price table instead.
        """
        usage = result.usage or {}
        tokens = [
            int(usage.get(key) or 0)
            for key in (
                "input_tokens",
                "output_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
            )
        ]
        cost = result.total_cost_usd
        if not any(tokens) and not cost:
            return  # failed before any API call: nothing was spent
        if resumed:
            price = self.settings.price(self.model)
            cost = price.cost(*tokens) if price is not None else None
        ctx.record_usage(ReportedUsage(self.model, *tokens, cost))


class _SessionMissing(Exception):
    """The session to resume does not exist (never written, or another cwd / config dir)."""


SESSION_SUMMARY_CHARS = 500
"""Tool results in the run log are cut to this much: the session's own transcript has them whole."""


def _summary(value: Any, limit: int = SESSION_SUMMARY_CHARS) -> str:
    if isinstance(value, list):
        value = " ".join(
            str(part.get("text", part)) if isinstance(part, dict) else str(part) for part in value
        )
    text = " ".join(str(value if value is not None else "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _log_message(message: Any, ctx: TaskContext) -> None:
    """The session's messages, summarised, in the task's run log: what the model said, each tool it
    called with its input, each tool result (cut short), and how the session ended."""
    from claude_agent_sdk import (
        AssistantMessage,
        ResultMessage,
        SystemMessage,
        TextBlock,
        ToolResultBlock,
        ToolUseBlock,
        UserMessage,
    )

    data: dict[str, Any] = {"session_message": type(message).__name__}
    if isinstance(message, SystemMessage):
        if message.subtype == "init":
            init = message.data
            model = init.get("model")
            data.update(session_id=init.get("session_id"), model=model, cwd=init.get("cwd"))
            ctx.log("session_message", f"session started (model {model})", data)
        return
    if isinstance(message, AssistantMessage | UserMessage):
        if message.parent_tool_use_id is not None:
            data["parent_tool_use_id"] = message.parent_tool_use_id
        content = message.content
        if isinstance(content, str):
            ctx.log("text", _summary(content), data)
            return
        for block in content:
            if isinstance(block, TextBlock):
                ctx.log("text", block.text, data)
            elif isinstance(block, ToolUseBlock):
                shown = _summary(block.input, 200)
                ctx.log(
                    "tool_use", f"{block.name} {shown}", {**data, "tool": block.name, "input": block.input}
                )
            elif isinstance(block, ToolResultBlock):
                error = " (error)" if block.is_error else ""
                ctx.log(
                    "tool_result",
                    f"result{error}: {_summary(block.content)}",
                    {**data, "tool_use_id": block.tool_use_id, "is_error": bool(block.is_error)},
                )
        return
    if isinstance(message, ResultMessage):
        data.update(
            subtype=message.subtype,
            turns=message.num_turns,
            is_error=message.is_error,
            cost_usd=message.total_cost_usd,
            duration_ms=message.duration_ms,
        )
        ctx.log(
            "session_message", f"session ended: {message.subtype} after {message.num_turns} turn(s)", data
        )


def _result_text(result: ResultMessage) -> str:
    """The most useful words of an error result: its errors, else its text (the "API Error: …" prose)."""
    errors = [e.strip() for e in (result.errors or []) if isinstance(e, str) and e.strip()]
    if errors:
        return "; ".join(errors)
    return (result.result or "").strip()


__all__ = ["ClaudeCodeExecutor"]
