"""The daemon's own variables: `<data dir>/env`, `env_file` and `[env]` in the config.

A daemon serves every project of the user but is started by whichever client came first, so
what it holds (API keys above all) must not depend on that client's shell. It starts from the
starter's variables named in `config.DAEMON_ENV_ALLOW` (all of them for a foreground `serve`),
then these layers go on top, each overriding the ones before:

1. `[env]` in the config file,
2. the file `env_file` in the config names,
3. `<data dir>/env`, the file `sidequest env set` writes: what you set last wins.

File format: one `NAME=value` per line; the value is everything after the first `=`, taken
literally (no quotes, no expansion); blank lines and lines starting with `#` are ignored.
The data dir's file is 0600. `SIDEQUEST_*` names are refused: the configuration is read
before these layers apply, so they could not take effect the same way everywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

from sidequest.config import ConfigError, Settings, daemon_environment
from sidequest.models import EnvVar

ENV_FILE = "env"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def env_file_path(settings: Settings) -> Path:
    return settings.home / ENV_FILE


def check_name(name: str) -> str | None:
    """Why `name` cannot be a variable of the daemon's environment, or None."""
    if not _NAME.match(name):
        return f"{name!r} is not a variable name (letters, digits and _, not starting with a digit)"
    if name.upper().startswith("SIDEQUEST_"):
        return f"{name} is a sidequest setting: put it in the config file or the environment of `serve`"
    return None


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of an env file; a missing file is empty; a bad line is a ConfigError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the env file: {exc}") from exc
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        problem = "expected NAME=value" if not sep else check_name(name.strip())
        if problem:
            raise ConfigError(f"{path}, line {number}: {problem}")
        values[name.strip()] = value
    return values


def set_variable(path: Path, name: str, value: str | None) -> bool:
    """Set (or with None remove) one variable, rewriting the file atomically as 0600; whether it was there.

    The caller makes the folder (the data dir: private, `daemon.make_private_dir`)."""
    lines = []
    found = False
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.partition("=")[0].strip() == name and "=" in line:
                found = True
                continue
            lines.append(line)
    if value is not None:
        lines.append(f"{name}={value}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a left-over temporary file keeps its old mode otherwise
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
    return found


def layers(settings: Settings, config_file: str | None) -> list[tuple[dict[str, str], EnvVar]]:
    """The layers that go on top of the starter's variables, lowest first, each with its source."""
    result: list[tuple[dict[str, str], EnvVar]] = []
    for name in settings.env:
        if problem := check_name(name):
            raise ConfigError(f"{config_file or 'config'}: [env]: {problem}")
    result.append((dict(settings.env), EnvVar(name="", source="config", file=config_file)))
    for path in (settings.env_file, env_file_path(settings)):
        if path is not None:
            result.append((read_env_file(path), EnvVar(name="", source="env file", file=str(path))))
    return result


def defined_environment(
    environ: Mapping[str, str], settings: Settings, config_file: str | None, *, allowlist: bool
) -> tuple[dict[str, str], list[EnvVar]]:
    """The daemon's environment and where each name came from.

    `allowlist`: keep only DAEMON_ENV_ALLOW of `environ` (a detached daemon); else all of it
    (a foreground `serve`, whose shell the user chose).
    """
    base = daemon_environment(environ, settings) if allowlist else dict(environ)
    env = dict(base)
    sources = {name: EnvVar(name=name, source="starter") for name in base}
    for values, source in layers(settings, config_file):
        for name, value in values.items():
            env[name] = value
            sources[name] = source.model_copy(update={"name": name})
    return env, sorted(sources.values(), key=lambda var: var.name)


def apply_to_process(settings: Settings) -> list[EnvVar]:
    """Put the layers into this process's environment (a `serve`, before its engine is built)."""
    env, sources = defined_environment(
        os.environ, settings, config_file_of(settings, os.environ), allowlist=False
    )
    os.environ.update(env)
    return sources


def config_file_of(settings: Settings, environ: Mapping[str, str]) -> str | None:
    """The config file the settings were read from, if it exists (for naming the source)."""
    explicit = environ.get("SIDEQUEST_CONFIG")
    path = Path(explicit).expanduser() if explicit else settings.home / "sidequest.toml"
    return str(path) if path.exists() else None
