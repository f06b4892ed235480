"""Settings: a TOML file plus SIDEQUEST_* environment variables.

Where the file comes from: `--config`, else `$SIDEQUEST_CONFIG`, else
`sidequest.toml` in the data dir. Unknown keys are errors naming the key,
because a misspelt limit that is silently ignored is worse than no limit.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sidequest.models import Duration, parse_age


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


ENV_ALLOW_DEFAULT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TERM", "USER")
"""What a command agent's child sees by default; API keys are never on this list."""


class AgentConfig(_Strict):
    """An agent the user defines. The model names agents; it never names code.

    `executor` is `python`, `command`, or the name of an installed plugin (entry-point
    group `sidequest.executors`); each executor reads only its own keys.
    """

    executor: str = "python"
    description: str = ""
    max_concurrency: int | None = Field(default=None, ge=1, le=1000)
    timeout: Duration | None = Field(default=None, description="default per-attempt timeout for this agent")
    # python
    callable: str | None = Field(default=None, description="'package.module:function', sync or async")
    isolation: Literal["process", "inline"] | None = Field(
        default=None,
        description="'process': a child process per attempt; 'inline': in the daemon. "
        "Unset: inline for an async def, else process",
    )
    # command (env_allow and env also shape a python agent's process)
    argv: list[str] | None = Field(
        default=None, min_length=1, description="no shell; {prompt} is one argument"
    )
    cwd: Path | None = Field(
        default=None, description="relative to the task's project; must stay inside it or allowed_roots"
    )
    env_allow: list[str] = Field(default_factory=lambda: list(ENV_ALLOW_DEFAULT))
    env: dict[str, str] = Field(default_factory=dict, description="fixed variables added to the child's env")
    output_limit: int = Field(default=1_000_000, ge=1, le=100_000_000, description="bytes of stdout kept")
    stdin_prompt: bool = Field(default=False, description="also write the prompt to the child's stdin")
    # plugins
    options: dict[str, Any] = Field(default_factory=dict, description="passed to a plugin executor's factory")

    @field_validator("callable")
    @classmethod
    def _callable_shape(cls, value: str | None) -> str | None:
        if value is None:
            return value
        module, sep, attr = value.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"callable must look like 'package.module:function', got {value!r}")
        return value

    @model_validator(mode="after")
    def _keys_fit_executor(self) -> AgentConfig:
        if self.executor == "python":
            if not self.callable:
                raise ValueError("executor 'python' needs callable = 'package.module:function'")
            if self.argv is not None:
                raise ValueError("argv is for executor 'command', not 'python'")
            return self
        if self.isolation is not None:
            raise ValueError(f"isolation is for executor 'python', not {self.executor!r}")
        if self.executor == "command":
            if not self.argv:
                raise ValueError("executor 'command' needs argv = ['program', 'arg', '{prompt}']")
            if "{prompt}" in self.argv[0]:
                raise ValueError("argv[0] (the program) cannot hold {prompt}: the model must not pick it")
            if self.callable is not None:
                raise ValueError("callable is for executor 'python', not 'command'")
        elif self.executor in ("anthropic", "claude-code"):
            raise ValueError(
                f"executor {self.executor!r} agents are defined in agent files (.claude/agents/NAME.md), "
                "not in the config"
            )
        return self


class HttpConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")


class Price(_Strict):
    """US dollars per million tokens; cache writes and reads are priced separately."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_write: float | None = Field(default=None, ge=0, description="default 1.25 x input")
    cache_read: float | None = Field(default=None, ge=0, description="default 0.1 x input")
    web_search_per_1k: float = Field(default=10.0, ge=0)

    def cost(
        self, input_tokens: int, output_tokens: int, cache_write: int, cache_read: int, searches: int = 0
    ) -> float:
        write = self.cache_write if self.cache_write is not None else self.input * 1.25
        read = self.cache_read if self.cache_read is not None else self.input * 0.1
        tokens = input_tokens * self.input + output_tokens * self.output + cache_write * write
        return (tokens + cache_read * read) / 1_000_000 + searches * self.web_search_per_1k / 1000


DEFAULT_MODELS = {
    "opus": "claude-opus-5-5",
    "sonnet": "claude-sonnet-5-5",
    "haiku": "claude-haiku-5-5",
}
"""Agent files say `model: sonnet`; this maps the alias to a model id (override under [models])."""

DEFAULT_PRICES = {
    "claude-opus-5-5": Price(input=5.0, output=25.0),
    "claude-sonnet-5-5": Price(input=3.0, output=15.0),
    "claude-haiku-5-5": Price(input=1.0, output=5.0),
}
"""List prices at the time of writing; [prices."MODEL"] in the config overrides or adds."""


class AnthropicConfig(_Strict):
    """The `anthropic` executor: the Messages API through the official SDK."""

    api_key_env: str = Field(default="ANTHROPIC_API_KEY", description="environment variable holding the key")
    base_url: str | None = Field(default=None, description="default: $ANTHROPIC_BASE_URL, else the real API")
    max_tokens: int = Field(default=16_000, ge=1, le=1_000_000, description="per turn, unless the agent says")
    max_turns: int = Field(default=20, ge=1, le=1000, description="unless the agent file sets maxTurns")
    request_timeout: Duration = Field(default=600.0, gt=0, description="one HTTP request")
    sdk_max_retries: int = Field(default=0, ge=0, le=1, description="the engine owns retries")
    max_retry_after: Duration = Field(default=300.0, description="cap on a server's retry-after")
    batch_poll_interval: Duration = Field(default=30.0, gt=0)
    web_search_tool: str = "web_search_20250305"
    web_fetch_tool: str = "web_fetch_20250910"


class ClaudeCodeConfig(_Strict):
    """The `claude-code` executor: headless Claude Code sessions through claude-agent-sdk."""

    permission_mode: Literal["default", "acceptEdits", "plan", "dontAsk", "bypassPermissions"] = Field(
        default="default", description="agent files may ask for less, never for bypassPermissions unless here"
    )
    cli_path: Path | None = Field(default=None, description="default: the CLI bundled with claude-agent-sdk")
    max_budget_usd: float | None = Field(default=None, gt=0, description="per task, unless the agent says")
    env_allow: list[str] = Field(default_factory=lambda: [*ENV_ALLOW_DEFAULT, "CLAUDE_CONFIG_DIR"])
    env: dict[str, str] = Field(default_factory=dict)


class TaskLogConfig(_Strict):
    """Each task's run log is capped: an agent looping on tool calls or a chatty stderr must not fill
    the disk. Attempt started/finished and retry entries are always kept (a few per attempt)."""

    max_events: int = Field(
        default=2000, ge=10, le=1_000_000, description="entries kept per task; then one log_cut marker"
    )
    max_event_chars: int = Field(
        default=4000, ge=100, le=1_000_000, description="longest message (and data as JSON) of one entry"
    )


class ScheduleConfig(_Strict):
    """Cron schedules: what a schedule may ask for."""

    min_interval: Duration = Field(
        default=60.0, gt=0, description="shortest gap between two fire times of one schedule"
    )
    allow_seconds: bool = Field(
        default=False, description="accept 6-field cron expressions whose first field is seconds"
    )
    misfire_grace: Duration = Field(
        default=60.0, gt=0, description="a run this late counts as missed (the misfire policy decides)"
    )
    max_schedules: int = Field(default=100_000, ge=1, description="active and paused schedules, all scopes")


POSTGRES_SCHEMES = ("postgresql", "postgres")
"""What makes `database` a PostgreSQL DSN rather than a DuckDB path (libpq's two URI schemes)."""

_PORT = re.compile(r"^(\[[^\]]*\]|[^:\[\]]*)(?::(\d*))?$")


def is_dsn(value: str) -> bool:
    """A DSN says so by its scheme: a DuckDB file named `postgres` (no `://`) stays a path."""
    scheme, sep, _ = value.strip().partition("://")
    return bool(sep) and scheme.lower() in POSTGRES_SCHEMES


def redact_dsn(dsn: str) -> str:
    """The DSN with its password (in the user part or a `password=` parameter) replaced by `***`.

    Every message, log line, `status` and `doctor` output shows the store through this: a DSN
    holds a credential, and those outputs are pasted into issues and chats."""
    try:
        parts = urlsplit(dsn.strip())
    except ValueError:
        return "postgresql://***"  # cannot tell where the password is: show nothing of it
    netloc = parts.netloc
    user, at, hosts = netloc.rpartition("@")
    if at:
        name, colon, _ = user.partition(":")
        netloc = f"{name}:***@{hosts}" if colon else f"{name}@{hosts}"
    query = "&".join(
        f"{key}=***" if key.lower() == "password" else f"{key}{sep}{value}"
        for key, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    # Not urlunsplit: it drops the `//` of an empty host (postgresql:///db?host=/socket).
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    return shown + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def check_dsn(dsn: str) -> str:
    """The DSN, stripped, if it has what a connection needs (scheme, a host or socket, a database
    name); otherwise ValueError naming what is missing, with the password redacted. Checked when the
    configuration loads, so a typo is reported by the setting's name, not by a failed connection."""
    dsn = dsn.strip()
    shown = redact_dsn(dsn)
    usage = "expected postgresql://USER:PASSWORD@HOST[:PORT]/DBNAME"
    try:
        parts = urlsplit(dsn)
        params = parse_qs(parts.query, keep_blank_values=True)
    except ValueError as exc:
        raise ValueError(f"{shown} is not a PostgreSQL DSN ({exc}); {usage}") from None
    if parts.scheme.lower() not in POSTGRES_SCHEMES:
        raise ValueError(f"{shown}: the scheme must be postgresql:// or postgres://; {usage}")
    hosts = parts.netloc.rpartition("@")[2]
    named_hosts = []
    for host in hosts.split(",") if hosts else []:
        match = _PORT.match(host)
        port = match.group(2) if match else None
        if match is None or (port is not None and not (port.isdigit() and 0 < int(port) < 65536)):
            raise ValueError(f"{shown}: {host!r} is not HOST or HOST:PORT (a port is 1-65535); {usage}")
        if match.group(1).strip("[]"):
            named_hosts.append(match.group(1))
    if not named_hosts and not any(v.strip() for v in params.get("host", [])):
        raise ValueError(
            f"{shown}: no host; name one (postgresql://USER@HOST/DBNAME) or a socket folder "
            "(postgresql:///DBNAME?host=/var/run/postgresql)"
        )
    dbname = parts.path.lstrip("/")
    if not dbname and not any(v.strip() for v in params.get("dbname", [])):
        raise ValueError(f"{shown}: no database name; {usage}")
    return dsn


def scrub_dsn(text: str, dsn: str | None) -> str:
    """`text` (an error from a driver or a store) with the DSN and its password shown redacted: a
    message is printed as it comes, and some drivers quote the connection string they were given."""
    if not dsn:
        return text
    text = text.replace(dsn, redact_dsn(dsn))
    userinfo = urlsplit(dsn).netloc.rpartition("@")[0]
    password = userinfo.partition(":")[2]
    passwords = [password, unquote(password), *parse_qs(urlsplit(dsn).query).get("password", [])]
    for secret in passwords:
        if secret:
            text = text.replace(secret, "***")
    return text


def _database(value: Any) -> Any:
    """A PostgreSQL DSN stays text (checked); anything else is the DuckDB file's path."""
    if isinstance(value, str) and is_dsn(value):
        return check_dsn(value)
    if isinstance(value, str) and "://" in value.strip():
        scheme = value.strip().partition("://")[0]
        raise ValueError(
            f"{scheme}:// is not a store sidequest knows; give a DuckDB file path or a "
            "postgresql://USER:PASSWORD@HOST[:PORT]/DBNAME DSN"
        )
    if isinstance(value, str):
        return Path(value)
    return value


Database = Annotated[Path | str | None, BeforeValidator(_database)]
"""`database`: a Path for DuckDB, a str for PostgreSQL (only ever a checked DSN)."""

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def check_queue_name(name: str) -> str:
    """One rule for queue names wherever they are typed ([workers] queues, `worker --queue`), so a
    name a worker accepts is one a task can carry."""
    if not _QUEUE_NAME.match(name):
        raise ValueError(f"{name!r} is not a queue name (letters, digits, '_', '.', ':', '-'; at most 64)")
    return name


class WorkersConfig(_Strict):
    """Which work this process takes from a shared (PostgreSQL) store, and how often it says it lives.

    The queue list is the whole routing model: a task carries one queue name, a worker serves a
    set of names, and nothing else decides who runs what (so it can be read off `sidequest workers`).
    """

    queues: list[str] = Field(
        default_factory=lambda: ["default"],
        min_length=1,
        description="queues the daemon and `sidequest worker` take tasks from (--queue overrides)",
    )
    heartbeat_seconds: Duration = Field(
        default=2.0, gt=0, le=60, description="how often a worker records that it is alive"
    )
    selectable_queues: list[str] = Field(
        default_factory=list,
        description="queues a submitter (a model) may name in options.queue; empty: none, tasks go "
        "to their agent file's queue or `default`",
    )

    @field_validator("queues", "selectable_queues", mode="after")
    @classmethod
    def _queue_names(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(check_queue_name(name) for name in value))


def _retention(value: Any) -> float | None:
    """`"off"` (or false) keeps finished tasks forever; anything else is an age above zero."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    try:
        return parse_age(value)
    except ValueError as exc:
        raise ValueError(f'{exc}; retention = "off" keeps finished tasks forever') from None


Retention = Annotated[float | None, BeforeValidator(_retention)]

DEFAULT_RETENTION = 30 * 24 * 3600.0


class Settings(_Strict):
    home: Path
    database: Database = Field(
        default=None,
        repr=False,  # a DSN holds a password; repr(settings) ends up in logs and tracebacks
        description="DuckDB file (default <home>/sidequest.duckdb), or a postgresql:// DSN",
    )
    max_concurrency: int = Field(default=4, ge=1, le=1000)
    max_prompt_bytes: int = Field(default=1_000_000, ge=1)
    max_request_bytes: int = Field(
        default=1_000_000,
        ge=1024,
        description="one limit for a whole submit: prompt, metadata, tags and options together",
    )
    max_queued_tasks: int = Field(
        default=100_000, ge=1, description="unfinished tasks (all scopes) before submits are refused"
    )
    max_lost_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="a task present at this many process deaths is failed as poisonous",
    )
    idempotency_window: Duration = Field(
        default=24 * 3600.0, gt=0, description="how long after a task finishes its idempotency key holds"
    )
    max_timeout: Duration = Field(default=7 * 24 * 3600.0, description="largest per-task timeout accepted")
    default_timeout: Duration | None = None
    lease_seconds: Duration = Field(default=30.0, gt=0)
    shutdown_grace: Duration = Field(default=10.0, description="how long running tasks may finish on SIGTERM")
    result_preview_chars: int = Field(default=500, ge=0, le=20_000)
    retention: Retention = Field(
        default=DEFAULT_RETENTION,
        description='finished tasks older than this are deleted with their rows; "off" keeps them',
    )
    http: HttpConfig = Field(default_factory=HttpConfig)
    agents: dict[str, AgentConfig] = Field(default_factory=dict)
    agent_dirs: list[Path] = Field(
        default_factory=list, description="more agent-file folders, searched after the scope's and the user's"
    )
    user_agent_dir: Path = Field(default_factory=lambda: Path("~/.claude/agents").expanduser())
    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="folders (besides the task's scope) that command and claude-code agents may run in",
    )
    default_model: str = "sonnet"
    models: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_MODELS))
    prices: dict[str, Price] = Field(default_factory=lambda: dict(DEFAULT_PRICES))
    anthropic: AnthropicConfig = Field(default_factory=AnthropicConfig)
    claude_code: ClaudeCodeConfig = Field(default_factory=ClaudeCodeConfig)
    schedules: ScheduleConfig = Field(default_factory=ScheduleConfig)
    task_log: TaskLogConfig = Field(default_factory=TaskLogConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    env: dict[str, str] = Field(
        default_factory=dict, description="variables of the daemon's environment (see sidequest/envfile.py)"
    )
    env_file: Path | None = Field(
        default=None, description="an env file (NAME=value lines) read on top of [env]; <home>/env goes last"
    )
    watch_config: bool = Field(
        default=True,
        description="the daemon checks every 2 s whether the config file or an env file changed, and reloads",
    )

    @field_validator("env_file", mode="after")
    @classmethod
    def _absolute_env_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        path = value.expanduser()
        if not path.is_absolute():
            raise ValueError(f"{str(path)!r} must be an absolute path (or start with ~)")
        return path

    @field_validator("models", mode="after")
    @classmethod
    def _merge_models(cls, value: dict[str, str]) -> dict[str, str]:
        return {**DEFAULT_MODELS, **value}

    @field_validator("prices", mode="after")
    @classmethod
    def _merge_prices(cls, value: dict[str, Price]) -> dict[str, Price]:
        return {**DEFAULT_PRICES, **value}

    @field_validator("agent_dirs", "user_agent_dir", "allowed_roots", mode="after")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        """Absolute only: relative to the server's working directory would change with how it started."""
        paths = [Path(p).expanduser() for p in (value if isinstance(value, list) else [value])]
        for path in paths:
            if not path.is_absolute():
                raise ValueError(f"{str(path)!r} must be an absolute path (or start with ~)")
        return paths if isinstance(value, list) else paths[0]

    def model_id(self, name: str | None) -> str:
        """An alias (`sonnet`), `inherit` or nothing means the configured model; ids pass through."""
        if not name or name == "inherit":
            name = self.default_model
        return self.models.get(name, name)

    def price(self, model: str) -> Price | None:
        """Exact id first, then the longest configured id the model starts with (dated snapshots)."""
        if model in self.prices:
            return self.prices[model]
        matches = [key for key in self.prices if model.startswith(key)]
        return self.prices[max(matches, key=len)] if matches else None

    @property
    def store_kind(self) -> Literal["duckdb", "postgres"]:
        return "postgres" if isinstance(self.database, str) else "duckdb"

    @property
    def database_url(self) -> str | None:
        """The PostgreSQL DSN (password included: for connecting only, never for showing)."""
        return self.database if isinstance(self.database, str) else None

    @property
    def database_path(self) -> Path:
        """The DuckDB file. With a DSN it is still the default path: things that live next to the
        store on one machine (nothing, today) must not be handed the DSN as a path."""
        return self.database if isinstance(self.database, Path) else self.home / "sidequest.duckdb"

    @property
    def database_display(self) -> str:
        """The store as people may see it: the file, or the DSN without its password."""
        return redact_dsn(self.database) if isinstance(self.database, str) else str(self.database_path)

    @property
    def token_path(self) -> Path:
        return self.home / "token"


_ENV_KEYS: dict[str, str] = {
    "SIDEQUEST_DATABASE": "database",
    "SIDEQUEST_MAX_CONCURRENCY": "max_concurrency",
    "SIDEQUEST_MAX_PROMPT_BYTES": "max_prompt_bytes",
    "SIDEQUEST_MAX_REQUEST_BYTES": "max_request_bytes",
    "SIDEQUEST_MAX_QUEUED_TASKS": "max_queued_tasks",
    "SIDEQUEST_MAX_LOST_ATTEMPTS": "max_lost_attempts",
    "SIDEQUEST_MAX_TIMEOUT": "max_timeout",
    "SIDEQUEST_DEFAULT_TIMEOUT": "default_timeout",
    "SIDEQUEST_LEASE_SECONDS": "lease_seconds",
    "SIDEQUEST_SHUTDOWN_GRACE": "shutdown_grace",
    "SIDEQUEST_RESULT_PREVIEW_CHARS": "result_preview_chars",
    "SIDEQUEST_RETENTION": "retention",
    "SIDEQUEST_USER_AGENT_DIR": "user_agent_dir",
    "SIDEQUEST_DEFAULT_MODEL": "default_model",
}
"""Environment variables that override top-level settings (documented in docs/configuration.md)."""

DAEMON_ENV_ALLOW: tuple[str, ...] = (
    # who and where: programs, the home folder, temporary files
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "TMPDIR",
    # language, locale, time zone, terminal type
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TERM",
    # XDG base directories (the default data dir lives under XDG_DATA_HOME)
    "XDG_DATA_HOME",
    "XDG_CONFIG_HOME",
    "XDG_CACHE_HOME",
    "XDG_STATE_HOME",
    "XDG_RUNTIME_DIR",
    # python agents import their modules from here
    "PYTHONPATH",
    # reaching the Anthropic API from behind a proxy or a private certificate authority
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "all_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    # the Anthropic API and Claude Code
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "CLAUDE_CONFIG_DIR",
    # sidequest's own settings (not every SIDEQUEST_* name: only the ones this file reads)
    "SIDEQUEST_HOME",
    "SIDEQUEST_CONFIG",
    "SIDEQUEST_HTTP_PORT",
    *_ENV_KEYS,
)
"""What a detached daemon keeps of the environment of the client that started it (`NAME_*` is a prefix).

Why an allowlist: the daemon is shared by every project of the user, but it is
started by whichever client came first, from that client's shell. Without a
list, one project's tokens (and its `CLAUDE_PROJECT_DIR`) would live on in the
daemon and be visible to every agent of every other project: python agents
read the daemon's `os.environ` directly. This tuple is the one place to extend;
`daemon_environment` adds only the names the configuration itself asks agents
to receive (`env_allow` lists, `anthropic.api_key_env`).
"""


def daemon_environment(environ: Mapping[str, str], settings: Settings) -> dict[str, str]:
    """The variables of `environ` a detached daemon starts with: DAEMON_ENV_ALLOW, plus the names the
    configuration passes on to agents, so that a configured `env_allow = ["GITHUB_TOKEN"]` still works."""
    names = {name for name in DAEMON_ENV_ALLOW if not name.endswith("*")}
    prefixes = tuple(name[:-1] for name in DAEMON_ENV_ALLOW if name.endswith("*"))
    names.add(settings.anthropic.api_key_env)
    names.update(settings.claude_code.env_allow)
    for agent in settings.agents.values():
        names.update(agent.env_allow)
    return {key: value for key, value in environ.items() if key in names or key.startswith(prefixes)}


def default_home(env: dict[str, str]) -> Path:
    if env.get("SIDEQUEST_HOME"):
        return Path(env["SIDEQUEST_HOME"]).expanduser()
    xdg = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser() / "sidequest"


def config_file_path(config_path: str | Path | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """The config file to read, and whether it was named (then it must exist)."""
    explicit = config_path or env.get("SIDEQUEST_CONFIG")
    if explicit:
        return Path(explicit).expanduser(), True
    return default_home(dict(env)) / "sidequest.toml", False


def load_settings(config_path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from file and environment; raise ConfigError naming what is wrong."""
    env = dict(os.environ if env is None else env)
    home = default_home(env)
    path, explicit = config_file_path(config_path, env)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read configuration: {exc}") from exc
    elif explicit:
        raise ConfigError(f"{path}: configuration file does not exist")
    if "home" in data:
        raise ConfigError(f"{path}: 'home' cannot be set in the file; set SIDEQUEST_HOME instead")
    for name, key in _ENV_KEYS.items():
        if env.get(name):
            data[key] = env[name]
    if env.get("SIDEQUEST_HTTP_PORT"):
        data.setdefault("http", {})["port"] = env["SIDEQUEST_HTTP_PORT"]
    data["home"] = home
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {format_validation_error(exc)}") from exc


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, naming the key: what users read when they get it wrong."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{where}'")
        else:
            parts.append(f"'{where}': {err['msg']}")
    return "; ".join(parts)
