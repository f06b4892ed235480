"""Settings: a TOML file plus SIDEQUEST_* environment variables.

Where the file comes from: `--config`, else `$SIDEQUEST_CONFIG`, else
`sidequest.toml` in the data dir. Unknown keys are errors naming the key,
because a misspelt limit that is silently ignored is worse than no limit.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sidequest.models import Duration


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AgentConfig(_Strict):
    """An agent the user defines. The model names agents; it never names code."""

    executor: Literal["python"] = "python"
    callable: str = Field(description="'package.module:function', sync or async")
    description: str = ""
    max_concurrency: int | None = Field(default=None, ge=1, le=1000)

    @field_validator("callable")
    @classmethod
    def _callable_shape(cls, value: str) -> str:
        module, sep, attr = value.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"callable must look like 'package.module:function', got {value!r}")
        return value


class HttpConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")


class Settings(_Strict):
    home: Path
    database: Path | None = Field(default=None, description="DuckDB file; default <home>/sidequest.duckdb")
    max_concurrency: int = Field(default=4, ge=1, le=1000)
    max_prompt_bytes: int = Field(default=1_000_000, ge=1)
    max_timeout: Duration = Field(default=7 * 24 * 3600.0, description="largest per-task timeout accepted")
    default_timeout: Duration | None = None
    lease_seconds: Duration = Field(default=30.0, gt=0)
    shutdown_grace: Duration = Field(default=10.0, description="how long running tasks may finish on SIGTERM")
    result_preview_chars: int = Field(default=500, ge=0, le=20_000)
    http: HttpConfig = Field(default_factory=HttpConfig)
    agents: dict[str, AgentConfig] = Field(default_factory=dict)

    @property
    def database_path(self) -> Path:
        return self.database or self.home / "sidequest.duckdb"

    @property
    def token_path(self) -> Path:
        return self.home / "token"


_ENV_KEYS: dict[str, str] = {
    "SIDEQUEST_DATABASE": "database",
    "SIDEQUEST_MAX_CONCURRENCY": "max_concurrency",
    "SIDEQUEST_MAX_PROMPT_BYTES": "max_prompt_bytes",
    "SIDEQUEST_MAX_TIMEOUT": "max_timeout",
    "SIDEQUEST_DEFAULT_TIMEOUT": "default_timeout",
    "SIDEQUEST_LEASE_SECONDS": "lease_seconds",
    "SIDEQUEST_SHUTDOWN_GRACE": "shutdown_grace",
    "SIDEQUEST_RESULT_PREVIEW_CHARS": "result_preview_chars",
}
"""Environment variables that override top-level settings (documented in docs/configuration.md)."""


def default_home(env: dict[str, str]) -> Path:
    if env.get("SIDEQUEST_HOME"):
        return Path(env["SIDEQUEST_HOME"]).expanduser()
    xdg = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser() / "sidequest"


def load_settings(config_path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Build settings from file and environment; raise ConfigError naming what is wrong."""
    env = dict(os.environ if env is None else env)
    home = default_home(env)
    explicit = config_path or env.get("SIDEQUEST_CONFIG")
    path = Path(explicit).expanduser() if explicit else home / "sidequest.toml"
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
