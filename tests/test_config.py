"""Configuration and option validation: bad input names what was wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sidequest.config import ConfigError, daemon_environment, load_settings
from sidequest.models import TaskOptions, parse_duration


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_config_file_in_the_data_dir_is_used(tmp_path: Path) -> None:
    write(
        tmp_path / "sidequest.toml",
        'max_concurrency = 7\n[agents.echo]\ncallable = "sidequest.testing.agents:echo"\n'
        "max_concurrency = 2\n",
    )
    settings = load_settings(env={"SIDEQUEST_HOME": str(tmp_path)})
    assert settings.home == tmp_path
    assert settings.max_concurrency == 7
    assert settings.agents["echo"].max_concurrency == 2
    assert settings.database_path == tmp_path / "sidequest.duckdb"


def test_explicit_path_beats_env_and_env_overrides_file(tmp_path: Path) -> None:
    explicit = write(tmp_path / "a.toml", "max_concurrency = 3\n")
    write(tmp_path / "b.toml", "max_concurrency = 5\n")
    env = {"SIDEQUEST_HOME": str(tmp_path), "SIDEQUEST_CONFIG": str(tmp_path / "b.toml")}
    assert load_settings(explicit, env=env).max_concurrency == 3
    assert load_settings(env=env).max_concurrency == 5
    env["SIDEQUEST_MAX_CONCURRENCY"] = "9"
    assert load_settings(env=env).max_concurrency == 9


def test_default_home_follows_xdg(tmp_path: Path) -> None:
    settings = load_settings(env={"XDG_DATA_HOME": str(tmp_path)})
    assert settings.home == tmp_path / "sidequest"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_concurency = 3\n", "unknown key 'max_concurency'"),
        ('[agents.x]\ncallable = "m:f"\nexecuter = "python"\n', "unknown key 'agents.x.executer'"),
        ('[agents.x]\ncallable = "no_colon"\n', "'agents.x.callable'"),
        ("max_concurrency = 0\n", "'max_concurrency'"),
        ('lease_seconds = "soon"\n', "not a duration"),
        ("max_concurrency = [\n", "cannot read configuration"),
    ],
)
def test_bad_config_is_an_error_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match=r"bad\.toml") as info:
        load_settings(path, env={"SIDEQUEST_HOME": str(tmp_path)})
    assert message in str(info.value)


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={"SIDEQUEST_HOME": str(tmp_path)})


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(90, 90.0), ("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0), ("500ms", 0.5), ("1d", 86400.0)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [-1, "-5s", "soon", "5 weeks", True, "31d", float("nan")])
def test_bad_durations_are_rejected(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_unknown_option_keys_are_rejected_by_name() -> None:
    with pytest.raises(ValidationError) as info:
        TaskOptions.model_validate({"prority": "high"})
    assert "prority" in str(info.value) and "Extra inputs are not permitted" in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"priority": "urgent"}, "'high', 'normal' or 'low'"),
        ({"timeout": 0}, "more than zero"),
        ({"timeout": "-3s"}, "zero or positive"),
        ({"max_retries": 100}, "less than or equal to 20"),
        ({"workflow_id": "wf_a", "workflow_name": "b"}, "not both"),
        ({"delay": "1m", "not_before": "2030-01-01T00:00:00Z"}, "not both"),
        ({"callback_url": "ftp://x"}, "URL scheme should be 'http' or 'https'"),
        ({"retry_backoff": {"initial": "1s", "cap": "5m"}}, "cap"),
    ],
)
def test_bad_options_say_what_is_accepted(options: dict, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        TaskOptions.model_validate(options)
    assert message in str(info.value)


def test_naive_not_before_is_taken_as_utc() -> None:
    options = TaskOptions.model_validate({"not_before": "2030-01-01T12:00:00"})
    assert options.not_before is not None and options.not_before.utcoffset().total_seconds() == 0


def test_daemon_environment_is_the_allowlist_plus_what_the_config_passes_to_agents(tmp_path: Path) -> None:
    write(
        tmp_path / "sidequest.toml",
        '[anthropic]\napi_key_env = "MY_CLAUDE_KEY"\n\n'
        '[agents.gh]\nexecutor = "command"\nargv = ["gh", "{prompt}"]\nenv_allow = ["GITHUB_TOKEN"]\n',
    )
    starter = {
        "SIDEQUEST_HOME": str(tmp_path),
        "SIDEQUEST_MAX_CONCURRENCY": "3",
        "PATH": "/usr/bin",
        "LC_TIME": "de_DE.UTF-8",
        "ANTHROPIC_API_KEY": "sk-default",
        "MY_CLAUDE_KEY": "sk-configured",
        "GITHUB_TOKEN": "gh-configured",
        "SIDEQUEST_CANARY_XYZ": "secret",
        "OTHER_PROJECT_TOKEN": "secret",
        "CLAUDE_PROJECT_DIR": "/some/project",
        "LD_PRELOAD": "/tmp/evil.so",
    }
    env = daemon_environment(starter, load_settings(env=starter))
    assert set(env) == {
        "SIDEQUEST_HOME",
        "SIDEQUEST_MAX_CONCURRENCY",
        "PATH",
        "LC_TIME",
        "ANTHROPIC_API_KEY",
        "MY_CLAUDE_KEY",
        "GITHUB_TOKEN",
    }
    assert env["MY_CLAUDE_KEY"] == "sk-configured"
