"""Configuration and option validation: bad input names what was wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sidequest.config import (
    ConfigError,
    daemon_environment,
    load_settings,
    redact_dsn,
    scrub_dsn,
)
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


# ---- database: a DuckDB path or a PostgreSQL DSN --------------------------------------------------

SECRET = "hunter2-Secret"


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://sq:{SECRET}@db.example:5432/sidequest",
        f"postgres://sq:{SECRET}@db.example/sidequest?sslmode=require",
        "postgresql:///sidequest?host=/var/run/postgresql",
        f"postgresql://sq@db1:5432,db2:5433/sidequest?password={SECRET}",
        "postgresql://sq@[::1]:5432/sidequest",
        "postgresql://sq@db.example?dbname=sidequest",
    ],
)
def test_a_postgres_dsn_is_the_store_and_the_duckdb_path_stays_put(tmp_path: Path, dsn: str) -> None:
    for env in ({"SIDEQUEST_DATABASE": dsn}, {}):
        if not env:
            write(tmp_path / "sidequest.toml", f"database = {dsn!r}\n")
        settings = load_settings(env={"SIDEQUEST_HOME": str(tmp_path), **env})
        assert settings.store_kind == "postgres"
        assert settings.database_url == dsn
        assert settings.database_path == tmp_path / "sidequest.duckdb"
        assert SECRET not in settings.database_display and SECRET not in repr(settings)
        assert settings.database_display.startswith(dsn.partition("://")[0] + "://")


def test_a_path_is_duckdb(tmp_path: Path) -> None:
    settings = load_settings(env={"SIDEQUEST_HOME": str(tmp_path), "SIDEQUEST_DATABASE": "/data/sq.duckdb"})
    assert settings.store_kind == "duckdb" and settings.database_url is None
    assert settings.database_path == Path("/data/sq.duckdb") == Path(settings.database_display)
    default = load_settings(env={"SIDEQUEST_HOME": str(tmp_path)})
    assert default.store_kind == "duckdb" and default.database_path == tmp_path / "sidequest.duckdb"


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        (f"postgresql://sq:{SECRET}@db.example/", "no database name"),
        (f"postgresql://sq:{SECRET}@/sidequest", "no host"),
        (f"postgresql://sq:{SECRET}@db.example:99999/sidequest", "a port is 1-65535"),
        (f"postgresql://sq:{SECRET}@db.example:pg/sidequest", "a port is 1-65535"),
        (f"mysql://sq:{SECRET}@db.example/sidequest", "not a store sidequest knows"),
    ],
)
def test_a_bad_dsn_names_the_setting_and_never_the_password(tmp_path: Path, dsn: str, message: str) -> None:
    path = write(tmp_path / "bad.toml", f"database = {dsn!r}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={"SIDEQUEST_HOME": str(tmp_path)})
    text = str(info.value)
    assert "'database'" in text and message in text and "bad.toml" in text
    assert SECRET not in text


def test_redact_dsn_hides_every_password() -> None:
    assert redact_dsn(f"postgresql://sq:{SECRET}@db:5432/x") == "postgresql://sq:***@db:5432/x"
    assert redact_dsn("postgresql://sq@db/x") == "postgresql://sq@db/x"
    assert redact_dsn(f"postgres://sq@db/x?sslmode=require&password={SECRET}") == (
        "postgres://sq@db/x?sslmode=require&password=***"
    )
    assert redact_dsn("postgresql:///x?host=/run/pg") == "postgresql:///x?host=/run/pg"
    assert redact_dsn(f"postgresql://sq:{SECRET}@with@db/x") == "postgresql://sq:***@db/x"  # '@' in it


def test_scrub_dsn_removes_the_dsn_and_the_password_from_a_message() -> None:
    dsn = f"postgresql://sq:{SECRET}@db/x"
    message = f"cannot connect to {dsn}: password {SECRET!r} refused"
    scrubbed = scrub_dsn(message, dsn)
    assert SECRET not in scrubbed and "postgresql://sq:***@db/x" in scrubbed
    assert scrub_dsn("unchanged", None) == "unchanged"


def test_workers_settings(tmp_path: Path) -> None:
    default = load_settings(env={"SIDEQUEST_HOME": str(tmp_path)})
    assert default.workers.queues == ["default"] and default.workers.heartbeat_seconds == 2.0
    write(
        tmp_path / "sidequest.toml",
        '[workers]\nqueues = ["gpu", "default", "gpu"]\nheartbeat_seconds = "5s"\n',
    )
    settings = load_settings(env={"SIDEQUEST_HOME": str(tmp_path)})
    assert settings.workers.queues == ["gpu", "default"] and settings.workers.heartbeat_seconds == 5.0
    for bad, message in (
        ('queues = ["two words"]', "not a queue name"),
        ("queues = []", "'workers.queues'"),
        ("heartbeat_seconds = 0", "'workers.heartbeat_seconds'"),
        ("heartbeet_seconds = 1", "unknown key 'workers.heartbeet_seconds'"),
    ):
        write(tmp_path / "sidequest.toml", f"[workers]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_settings(env={"SIDEQUEST_HOME": str(tmp_path)})
