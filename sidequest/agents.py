"""Agent definitions: the names a model may launch, and what each one runs.

The model never chooses code: it names an agent, and only the user defines
agents, in two places:

- Claude Code subagent files (markdown with YAML front matter, body = system
  prompt), so users reuse the agents they already have. Looked up in the
  scope's `.claude/agents/`, then `~/.claude/agents/`, then `agent_dirs`.
- `[agents.NAME]` tables in the config (python callables, commands, plugins).
  These win a name clash, with a warning, because they are the more deliberate
  choice.

Files are re-read when they change (mtime and size), so editing an agent needs
no restart; a broken file is reported with its path and the problem, never
silently skipped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import frontmatter
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sidequest.agent_definition import AgentDefinition, SidequestKeys
from sidequest.config import AgentConfig, ConfigError, Settings
from sidequest.executors.base import BuildWarnings, Executor
from sidequest.executors.command import CommandExecutor
from sidequest.executors.python import build_python_executor
from sidequest.executors.sandbox import is_inside
from sidequest.models import AgentInfo, AgentProblem
from sidequest.suggest import did_you_mean

if TYPE_CHECKING:
    from sidequest.executors.anthropic import ClientPool

log = logging.getLogger(__name__)

EXECUTOR_ENTRY_POINTS = "sidequest.executors"
"""Plugins register `NAME = "package.module:factory"`; factory(agent_name, options, settings) -> Executor."""

FILE_EXECUTORS = ("anthropic", "claude-code")
MAX_AGENT_FILES = 500
"""Per folder: a home directory mistaken for an agent folder should not be parsed file by file."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AgentLookupError(Exception):
    """No usable agent by that name or path; the message says what exists or what is wrong."""


class AgentFileError(Exception):
    """An agent file cannot be used; the message starts with the file's path."""


def _tool_list(value: Any) -> list[str] | None:
    """Claude Code accepts `tools: Read, Grep` as well as a YAML list."""
    if value is None:
        return None
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [item.strip() for item in value if item.strip()]
    raise ValueError("must be a list of tool names or a comma-separated string")


class AgentFrontMatter(BaseModel):
    """Claude Code's subagent fields we use; other Claude Code fields are allowed and ignored."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str
    description: str = Field(min_length=1)
    tools: list[str] | None = None
    disallowed_tools: list[str] | None = Field(default=None, alias="disallowedTools")
    model: str | None = None
    permission_mode: str | None = Field(default=None, alias="permissionMode")
    max_turns: int | None = Field(default=None, alias="maxTurns", ge=1, le=1000)
    executor: Literal["anthropic", "claude-code"] | None = None
    sidequest: SidequestKeys = Field(default_factory=SidequestKeys)

    @field_validator("tools", "disallowed_tools", mode="before")
    @classmethod
    def _tools(cls, value: Any) -> list[str] | None:
        return _tool_list(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a usable agent name (letters, digits, '-', '_', '.'; max 64)")
        return value


def load_agent_file(path: Path) -> AgentDefinition:
    """Parse one agent file; AgentFileError names the file and what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentFileError(f"{path}: cannot read: {exc}") from exc
    return parse_agent_text(text, path)


def parse_agent_text(text: str, path: Path) -> AgentDefinition:
    """Parse an agent file's text (read from `path`, or carried in a task's snapshot)."""
    if not text.lstrip().startswith("---"):
        raise AgentFileError(f"{path}: no YAML front matter (the file must start with a '---' block)")
    try:
        post = frontmatter.loads(text)
    except yaml.YAMLError as exc:
        raise AgentFileError(f"{path}: bad YAML front matter: {' '.join(str(exc).split())}") from exc
    except Exception as exc:  # the library raises plain ValueErrors for odd layouts
        raise AgentFileError(f"{path}: cannot parse front matter: {exc}") from exc
    if not post.metadata:
        raise AgentFileError(f"{path}: empty front matter; 'name' and 'description' are required")
    try:
        meta = AgentFrontMatter.model_validate(post.metadata)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "missing":
                problems.append(f"missing required field '{where}'")
            elif err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{where}'")
            elif err["type"] == "literal_error" and where.endswith("executor"):
                problems.append(
                    f"unknown executor {err['input']!r} in '{where}'; use one of: {', '.join(FILE_EXECUTORS)}"
                )
            else:
                problems.append(f"'{where}': {err['msg']}")
        raise AgentFileError(f"{path}: {'; '.join(problems)}") from exc
    if meta.executor and meta.sidequest.executor and meta.executor != meta.sidequest.executor:
        raise AgentFileError(
            f"{path}: 'executor' ({meta.executor}) and 'sidequest.executor' "
            f"({meta.sidequest.executor}) disagree"
        )
    if meta.permission_mode == "bypassPermissions":
        raise AgentFileError(
            f"{path}: permissionMode 'bypassPermissions' is refused in agent files; "
            "set claude_code.permission_mode in the sidequest config if you really want it"
        )
    return AgentDefinition(
        name=meta.name,
        description=" ".join(meta.description.split()),
        executor=meta.sidequest.executor or meta.executor or "anthropic",
        model=meta.model,
        tools=meta.tools,
        disallowed_tools=meta.disallowed_tools,
        permission_mode=meta.permission_mode,
        max_turns=meta.max_turns,
        system_prompt=post.content.strip(),
        source=path,
        keys=meta.sidequest,
        text=text,
    )


def agent_snapshot(definition: AgentDefinition) -> dict[str, Any]:
    """What travels with a task submitted to an agent file: a worker on another machine (or after
    the file changed) runs exactly what was submitted. The text holds front matter and body; the
    hash names the version in logs and lets workers cache what they built."""
    return {
        "source": str(definition.source),
        "text": definition.text,
        "sha256": hashlib.sha256(definition.text.encode("utf-8")).hexdigest(),
    }


@dataclass(frozen=True)
class Agent:
    """What the engine runs for a task."""

    name: str
    description: str
    executor: Executor
    max_concurrency: int | None
    source: str = "config"
    model: str | None = None
    timeout: float | None = None
    warnings: tuple[str, ...] = ()
    definition: AgentDefinition | None = None
    """The agent file it was built from (None: a config agent, which is code on each machine)."""

    def info(self) -> AgentInfo:
        return AgentInfo(
            name=self.name,
            executor=self.executor.name,
            description=self.description,
            model=self.model,
            source=self.source,
            max_concurrency=self.max_concurrency,
            warnings=list(self.warnings),
        )


def _plugin_factories() -> dict[str, Callable[..., Executor]]:
    return {ep.name: ep for ep in entry_points(group=EXECUTOR_ENTRY_POINTS)}  # type: ignore[misc]


def _build_config_executor(name: str, config: AgentConfig, settings: Settings) -> Executor:
    match config.executor:
        case "python":
            return build_python_executor(name, config)
        case "command":
            return CommandExecutor(name, config, settings)
    plugins = _plugin_factories()
    entry = plugins.get(config.executor)
    if entry is None:
        known = ", ".join(["python", "command", *sorted(plugins)])
        raise ConfigError(
            f"agents.{name}: unknown executor {config.executor!r}; known: {known} "
            f"(plugins register in the {EXECUTOR_ENTRY_POINTS!r} entry-point group)"
        )
    try:
        factory = entry.load()  # type: ignore[attr-defined]
        executor = factory(name, dict(config.options), settings)
    except Exception as exc:
        raise ConfigError(f"agents.{name}: plugin executor {config.executor!r} failed to load: {exc}") from (
            exc
        )
    if not hasattr(executor, "run"):
        raise ConfigError(f"agents.{name}: plugin {config.executor!r} returned {executor!r}, not an executor")
    if not getattr(executor, "name", None):
        executor.name = config.executor  # type: ignore[misc]
    return executor


@dataclass
class _Cached:
    stamp: tuple[int, int]
    value: AgentDefinition | AgentFileError
    agent: Agent | None = None


@dataclass
class Catalog:
    """What one scope can see: agents by name, and the files that could not be used."""

    agents: dict[str, Agent] = field(default_factory=dict)
    problems: list[AgentProblem] = field(default_factory=list)


class AgentRegistry:
    """Config agents plus agent files, resolved per scope (each project has its own `.claude/agents/`)."""

    def __init__(self, settings: Settings, config_agents: dict[str, Agent]) -> None:
        self.settings = settings
        self._config = dict(sorted(config_agents.items()))
        self._files: dict[Path, _Cached] = {}
        self._snapshots: dict[str, Agent] = {}
        self._clash_warned: set[tuple[str, Path]] = set()
        self._clients: ClientPool | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AgentRegistry:
        agents = {}
        for name, cfg in settings.agents.items():
            agents[name] = Agent(
                name,
                cfg.description,
                _build_config_executor(name, cfg, settings),
                cfg.max_concurrency,
                timeout=cfg.timeout,
            )
        return cls(settings, agents)

    def config_agents(self) -> dict[str, Agent]:
        """The agents defined in the configuration (not files), by name."""
        return dict(self._config)

    # ---- roots -----------------------------------------------------------

    def roots(self, scope: str | None) -> list[Path]:
        """Where agent files may live for this scope, in lookup order."""
        roots = []
        if scope and os.path.isabs(scope):
            roots.append(Path(scope) / ".claude" / "agents")
        roots.append(self.settings.user_agent_dir)
        roots.extend(self.settings.agent_dirs)
        return roots

    # ---- lookup ----------------------------------------------------------

    def get(self, name: str, scope: str | None = None) -> Agent | None:
        """The agent a task names, or None. Config agents are a dict hit: the hot path never scans."""
        found = self._config.get(name)
        if found is not None:
            return found
        try:
            return self.resolve(name, scope)
        except AgentLookupError:
            return None

    def resolve(self, name_or_path: str, scope: str | None) -> Agent:
        """By name (config first, then files in root order) or by a file path inside the roots."""
        found = self._config.get(name_or_path)
        if found is not None:
            return found
        if _looks_like_path(name_or_path):
            return self._resolve_path(name_or_path, scope)
        catalog = self._scan(scope, want=name_or_path)
        agent = catalog.agents.get(name_or_path)
        if agent is not None:
            return agent
        for problem in catalog.problems:
            if Path(problem.file).stem == name_or_path:
                raise AgentLookupError(f"agent {name_or_path!r} cannot be used: {problem.error}")
        names = {*self._config, *catalog.agents}
        known = ", ".join(sorted(names))
        where = ", ".join(str(r) for r in self.roots(scope))
        hint = did_you_mean(name_or_path, names)
        raise AgentLookupError(
            f"no agent named {name_or_path!r}; {hint + ' ' if hint else ''}known agents: {known or 'none'} "
            f"(agent files are read from {where}; config agents from [agents.NAME])"
        )

    def _resolve_path(self, raw: str, scope: str | None) -> Agent:
        try:
            path = Path(raw).expanduser()
        except RuntimeError as exc:  # `~nosuchuser/x.md`: no such home folder
            raise AgentLookupError(f"agent file {raw!r}: {exc}") from exc
        if not path.is_absolute():
            if not (scope and os.path.isabs(scope)):
                raise AgentLookupError(f"relative agent path {raw!r} needs a scope that is a directory")
            path = Path(scope) / path
        real = Path(os.path.realpath(path))
        roots = self.roots(scope)
        if not any(is_inside(str(real), os.path.realpath(root)) for root in roots):
            raise AgentLookupError(
                f"agent file {raw!r} is outside the agent folders; allowed: "
                + ", ".join(str(r) for r in roots)
                + " (add folders with agent_dirs in the config)"
            )
        if not real.is_file():
            raise AgentLookupError(f"agent file {raw!r} does not exist")
        cached = self._load(real)
        if isinstance(cached.value, AgentFileError):
            raise AgentLookupError(str(cached.value))
        return self._agent(cached)

    def catalog(self, scope: str | None) -> Catalog:
        """Everything this scope can launch, for list_agents and the CLI."""
        catalog = self._scan(scope)
        merged = Catalog(dict(self._config), catalog.problems)
        for name, agent in catalog.agents.items():
            merged.agents.setdefault(name, agent)
        merged.agents = dict(sorted(merged.agents.items()))
        return merged

    def infos(self, scope: str | None = None) -> list[AgentInfo]:
        return [agent.info() for agent in self.catalog(scope).agents.values()]

    def names(self, scope: str | None = None) -> list[str]:
        return list(self.catalog(scope).agents)

    # ---- files -----------------------------------------------------------

    def _scan(self, scope: str | None, want: str | None = None) -> Catalog:
        catalog = Catalog()
        for root in self.roots(scope):
            for path in _agent_files(root):
                cached = self._load(path)
                if isinstance(cached.value, AgentFileError):
                    catalog.problems.append(AgentProblem(file=str(path), error=str(cached.value)))
                    continue
                name = cached.value.name
                if name in self._config:
                    self._warn_clash(name, path)
                    continue
                if name in catalog.agents:
                    continue  # an earlier root wins, as in Claude Code (project over user)
                catalog.agents[name] = self._agent(cached)
            if want is not None and want in catalog.agents:
                break
        return catalog

    def _load(self, path: Path) -> _Cached:
        try:
            st = path.stat()
        except OSError as exc:
            return _Cached((0, 0), AgentFileError(f"{path}: cannot read: {exc}"))
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._files.get(path)
        if cached is None or cached.stamp != stamp:
            try:
                value: AgentDefinition | AgentFileError = load_agent_file(path)
            except AgentFileError as exc:
                value = exc
                log.warning("%s", exc)
            cached = _Cached(stamp, value)
            self._files[path] = cached
        return cached

    def _agent(self, cached: _Cached) -> Agent:
        if cached.agent is None:
            definition = cached.value
            assert isinstance(definition, AgentDefinition)
            cached.agent = self._file_agent(definition)
        return cached.agent

    def _file_agent(self, definition: AgentDefinition) -> Agent:
        executor, warnings = self._build_file_executor(definition)
        return Agent(
            name=definition.name,
            description=definition.description,
            executor=executor,
            max_concurrency=definition.keys.max_concurrency,
            source=str(definition.source),
            model=self.settings.model_id(definition.model),
            timeout=definition.keys.timeout,
            warnings=tuple(warnings),
            definition=definition,
        )

    def from_snapshot(self, snapshot: dict[str, Any]) -> Agent:
        """The agent a task's snapshot describes, built as it was at submit (cached by content hash).

        The snapshot was made by a trusted process from a file in a trusted root and stored by
        it; a worker never reads agent folders for such a task."""
        key = str(snapshot.get("sha256", ""))
        agent = self._snapshots.get(key)
        if agent is None:
            try:
                definition = parse_agent_text(str(snapshot["text"]), Path(str(snapshot["source"])))
            except (KeyError, AgentFileError) as exc:
                raise AgentLookupError(
                    f"the agent snapshot stored with this task is unusable: {exc}"
                ) from exc
            agent = self._file_agent(definition)
            self._snapshots[key] = agent
        return agent

    def _build_file_executor(self, definition: AgentDefinition) -> tuple[Executor, list[str]]:
        # Imported here, not above, only because they load the anthropic SDK (slow to import, and
        # unneeded by a process that runs no agent file); they import nothing from this module.
        if definition.executor == "claude-code":
            from sidequest.executors.claude_code import ClaudeCodeExecutor

            executor: Executor = ClaudeCodeExecutor(definition, self.settings)
        else:
            from sidequest.executors.anthropic import AnthropicExecutor

            if self._clients is None:  # one pool per registry: every agent file shares connections
                from sidequest.executors.anthropic import ClientPool

                self._clients = ClientPool(self.settings)
            executor = AnthropicExecutor(definition, self.settings, self._clients)
        return executor, list(executor.warnings) if isinstance(executor, BuildWarnings) else []

    def _warn_clash(self, name: str, path: Path) -> None:
        if (name, path) not in self._clash_warned:
            self._clash_warned.add((name, path))
            log.warning("agent %r in %s is shadowed by [agents.%s] in the config", name, path, name)

    async def aclose(self) -> None:
        if self._clients is not None:
            await self._clients.aclose()
            self._clients = None


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.endswith(".md") or value.startswith("~")


def _agent_files(root: Path) -> list[Path]:
    try:
        if not root.is_dir():
            return []
    except OSError:  # a scope the OS refuses (name too long): it holds no agent folder
        return []
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".md"))
        if len(files) >= MAX_AGENT_FILES:
            log.warning("over %d agent files under %s; reading the first ones", MAX_AGENT_FILES, root)
            return files[:MAX_AGENT_FILES]
    return files
