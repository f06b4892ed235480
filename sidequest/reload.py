"""Reloading the daemon's configuration while it serves: `sidequest reload` and the file watch.

A daemon is shared and long-lived, so a restart to add an agent or an API key costs every
running task its attempt. Most settings are read per request or per attempt and can change in
place; the few that cannot (the socket, the store) are reported as "needs restart" instead of
being applied halfway or ignored in silence.

A new version that fails to parse or validate is never applied: the old one keeps serving and
the problem is kept for `status`, `doctor` and the REST status route, until a later version
loads. The watch is a stat of a few files every WATCH_INTERVAL seconds (inode, size, mtime):
no dependency, works on every file system, and sees editors that replace a file rather than
write into it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from sidequest.config import ConfigError, Settings, config_file_path, load_settings
from sidequest.envfile import defined_environment, env_file_path, layers
from sidequest.models import ConfigStatus, EnvVar, ReloadResult, utcnow

if TYPE_CHECKING:
    from sidequest.agents import AgentRegistry
    from sidequest.engine.engine import Engine

log = logging.getLogger("sidequest.reload")

WATCH_INTERVAL = 2.0
"""Seconds between two looks at the files: a change is live within this, at a stat per file."""

RESTART_KEYS = (
    "http.host",
    "http.port",
    "database",
    "lease_seconds",
    "workers.queues",
    "workers.heartbeat_seconds",
)
"""Settings a running daemon cannot change: its listening socket, its store, the lease renewal
loop's period (set once at start from `lease_seconds`), and what its worker registered as in a
shared store (its queues, its heartbeat period), which other processes read."""

_NESTED = ("http", "workers", "agents", "anthropic", "claude_code", "schedules", "prices", "models", "env")
"""Tables whose changes are named key by key (`agents.research`), not as the whole table."""

Stamp = tuple[tuple[str, int, int, int] | None, ...]


def _stamp(paths: list[Path]) -> Stamp:
    """Cheap identity of the files: (inode, size, mtime) each, None when missing."""
    found: list[tuple[str, int, int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            found.append(None)
        else:
            found.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(found)


def _digest(paths: list[Path]) -> str:
    """What the files hold, so "loaded vs on disk" is about content, not a touched mtime."""
    hasher = hashlib.sha256()
    for path in paths:
        hasher.update(str(path).encode() + b"\0")
        try:
            hasher.update(path.read_bytes())
        except OSError:
            hasher.update(b"\0missing\0")
        hasher.update(b"\0")
    return hasher.hexdigest()


def _flatten(settings: Settings) -> dict[str, Any]:
    """Settings as dotted keys, one level into the tables users edit entry by entry."""
    flat: dict[str, Any] = {}
    for key, value in settings.model_dump(mode="json").items():
        if key in _NESTED and isinstance(value, dict):
            for inner, item in value.items():
                flat[f"{key}.{inner}"] = item
            if not value:
                flat[key] = {}
        else:
            flat[key] = value
    return flat


def _changed_keys(before: Settings, after: Settings) -> list[str]:
    old, new = _flatten(before), _flatten(after)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k != "env")
    # [env] names its values' keys only: values may be secrets, and the environment list says the rest
    return [f"env.{k[4:]}" if k.startswith("env.") else k for k in keys]


def _value(settings: Settings, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _starter_base(environ: Mapping[str, str], settings: Settings, config_file: str | None) -> dict[str, str]:
    """The environment the daemon had before its env layers, as far as it can tell.

    A detached daemon is started with the layers already applied (so a PYTHONPATH there reaches the
    interpreter); a name whose value equals its layer's is taken to come from the layer, so that
    removing it from the file and reloading removes it from the daemon.
    """
    base = dict(environ)
    try:
        found = layers(settings, config_file)
    except ConfigError:
        return base
    for values, _source in found:
        for name, value in values.items():
            if base.get(name) == value:
                del base[name]
    return base


class Reloader:
    """The configuration a daemon serves with, and how it is replaced.

    Built before the daemon applies its env layers (`apply_environment`), from the process
    environment as it started; `attach` gives it the engine the settings go to.
    """

    def __init__(self, settings: Settings, config_path: str | Path | None = None) -> None:
        self._settings = settings
        self._engine: Engine | None = None
        self._config_path = config_path
        # The data dir is the one this daemon owns, whatever the variables say now.
        self._environ = {**os.environ, "SIDEQUEST_HOME": str(settings.home)}
        self._path, _ = config_file_path(config_path, self._environ)
        self._base = _starter_base(os.environ, settings, self._file())
        self._env, self.environment = self._environment(settings)
        try:
            self._start_raw = load_settings(config_path, self._environ)
        except ConfigError:  # changed since the command line read it: compare with what serves
            self._start_raw = settings
        self._raw = self._start_raw
        self._files = self._watched(settings)
        self._stamp = _stamp(self._files)
        self._loaded_digest = _digest(self._files)
        self.loaded_at: datetime = utcnow()
        self.problem: str | None = None
        self.problem_at: datetime | None = None
        self.needs_restart: list[str] = []
        self._lock = anyio.Lock()

    def attach(self, engine: Engine) -> None:
        self._engine = engine

    def _file(self) -> str | None:
        return str(self._path) if self._path.exists() else None

    def _watched(self, settings: Settings) -> list[Path]:
        files = [self._path, env_file_path(settings)]
        return files + ([settings.env_file] if settings.env_file is not None else [])

    def _environment(self, settings: Settings) -> tuple[dict[str, str], list[EnvVar]]:
        return defined_environment(self._base, settings, self._file(), allowlist=False)

    def apply_environment(self) -> list[EnvVar]:
        """Put the layers into os.environ at start; what each name came from, for `status`."""
        os.environ.update(self._env)
        return self.environment

    def status(self) -> ConfigStatus:
        return ConfigStatus(
            file=self._file(),
            loaded_at=self.loaded_at,
            problem=self.problem,
            problem_at=self.problem_at,
            needs_restart=list(self.needs_restart),
            differs_on_disk=_digest(self._files) != self._loaded_digest,
        )

    def env_names(self) -> list[str]:
        """Names only: what a client compares with its own environment (sidequest.keynotice)."""
        return sorted(os.environ)

    # ---- reloading -------------------------------------------------------

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """The daemon's loop: reload when a watched file changed (unless `watch_config = false`)."""
        while True:
            await anyio.sleep(interval)
            if not self._settings.watch_config:
                continue
            stamp = await anyio.to_thread.run_sync(_stamp, self._files)
            if stamp != self._stamp:
                await self.reload(reason="a watched file changed")

    async def reload(self, reason: str = "asked to") -> ReloadResult:
        """Read the files again; apply what can change live, or keep the old configuration."""
        async with self._lock:
            return await self._reload(reason)

    async def _reload(self, reason: str) -> ReloadResult:
        current = self._settings
        files = self._watched(current)
        stamp = await anyio.to_thread.run_sync(_stamp, files)
        digest = await anyio.to_thread.run_sync(_digest, files)
        try:
            raw, settings, env, sources, registry = await anyio.to_thread.run_sync(self._read, current)
        except Exception as exc:  # whatever the new version holds, the daemon keeps serving the old
            problem = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            self._files, self._stamp = files, stamp
            self.problem, self.problem_at = " ".join(problem.split()), utcnow()
            log.warning(
                "configuration not reloaded (%s): %s; the one loaded at %s keeps serving",
                reason,
                self.problem,
                self.loaded_at.isoformat(timespec="seconds"),
            )
            return ReloadResult(applied=False, problem=self.problem, config=self.status())
        changed = [k for k in _changed_keys(self._raw, raw) if k not in RESTART_KEYS]
        env_changed = sorted(n for n in env.keys() | self._env.keys() if env.get(n) != self._env.get(n))
        for name in env_changed:
            if name in env:
                os.environ[name] = env[name]
            else:
                os.environ.pop(name, None)
        if self._engine is not None and (changed or env_changed):
            self._engine.apply_settings(settings, registry)
        else:  # an editor's save or a touch: nothing to apply, and no registry to keep until shutdown
            await registry.aclose()
        self._settings = settings
        self._raw, self._env, self.environment = raw, env, sources
        self._files = self._watched(settings)
        self._stamp, self._loaded_digest = stamp, digest
        if self._files != files:  # env_file moved: look at the new one from now on
            self._stamp = _stamp(self._files)
            self._loaded_digest = _digest(self._files)
        self.loaded_at = utcnow()
        self.problem = self.problem_at = None
        before = self.needs_restart
        self.needs_restart = [k for k in RESTART_KEYS if _value(raw, k) != _value(self._start_raw, k)]
        if changed or env_changed:
            log.info(
                "configuration reloaded (%s): %s",
                reason,
                ", ".join([*changed, *(f"environment {n}" for n in env_changed)]),
            )
        if self.needs_restart and self.needs_restart != before:
            log.warning("changed, but needs a restart: %s", ", ".join(self.needs_restart))
        return ReloadResult(
            applied=True,
            changed=changed,
            environment=env_changed,
            needs_restart=list(self.needs_restart),
            config=self.status(),
        )

    def _read(
        self, current: Settings
    ) -> tuple[Settings, Settings, dict[str, str], list[EnvVar], AgentRegistry]:
        """The new version, checked all the way (env files, agent executors) before anything changes."""
        from sidequest.agents import AgentRegistry

        raw = load_settings(self._config_path, self._environ)
        # The socket and the store stay as they are, and `serve --host/--port` keep holding.
        pinned = {
            "http": current.http,
            "database": current.database,
            "lease_seconds": current.lease_seconds,
            "workers": current.workers,
        }
        settings = raw.model_copy(update=pinned)
        env, sources = self._environment(settings)
        registry = AgentRegistry.from_settings(settings)
        return raw, settings, env, sources, registry
