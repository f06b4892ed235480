"""Agent files (Claude Code subagent format) as the model sees them through list_agents and task_async."""

from __future__ import annotations

import logging
import os
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import all_test_agents
from mcp import Client
from tools import call, call_error, submit, wait_status

from sidequest.agents import AgentRegistry, load_agent_file
from sidequest.config import AgentConfig, ConfigError, Settings
from sidequest.engine.engine import Engine
from sidequest.server.mcp import build_server

RESEARCHER = """\
---
name: researcher
description: Finds and summarises sources on a topic.
tools: WebSearch, WebFetch
model: haiku
maxTurns: 4
sidequest:
  max_concurrency: 2
---
You are a careful researcher. Cite every source.
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / ".claude" / "agents").mkdir(parents=True)
    return root


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        agents=all_test_agents(),
        user_agent_dir=tmp_path / "user-agents",
        agent_dirs=[tmp_path / "shared-agents"],
        lease_seconds=2.0,
        shutdown_grace=1.0,
    )


@pytest.fixture
async def client(engine: Engine, project: Path) -> AsyncIterator[Client]:
    async with Client(build_server(engine, str(project))) as c:
        yield c


def agents_by_name(listing: dict) -> dict[str, dict]:
    return {a["name"]: a for a in listing["agents"]}


async def test_list_agents_shows_file_agents_with_their_source(client: Client, project: Path) -> None:
    path = write(project / ".claude" / "agents" / "researcher.md", RESEARCHER)
    listing = await call(client, "list_agents")
    agent = agents_by_name(listing)["researcher"]
    assert agent["executor"] == "anthropic"
    assert agent["description"] == "Finds and summarises sources on a topic."
    assert agent["model"] == "claude-haiku-5-5"  # the alias, mapped through [models]
    assert agent["source"] == str(path)
    assert agent["max_concurrency"] == 2
    assert agents_by_name(listing)["echo"]["source"] == "config"
    assert listing["problems"] == []


def test_front_matter_fields_are_parsed(tmp_path: Path) -> None:
    definition = load_agent_file(write(tmp_path / "r.md", RESEARCHER))
    assert definition.tools == ["WebSearch", "WebFetch"]
    assert definition.max_turns == 4
    assert definition.system_prompt == "You are a careful researcher. Cite every source."
    assert definition.executor == "anthropic"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("---\nname: x\ndescription: [unclosed\n---\nbody\n", "bad YAML front matter"),
        ("---\ndescription: no name here\n---\nbody\n", "missing required field 'name'"),
        ("---\nname: x\n---\nbody\n", "missing required field 'description'"),
        ("no front matter at all\n", "no YAML front matter"),
        ("---\nname: x\ndescription: d\nexecutor: gpt\n---\n", "unknown executor 'gpt'"),
        ("---\nname: x\ndescription: d\nsidequest:\n  executer: claude-code\n---\n", "unknown key"),
        ("---\nname: x\ndescription: d\npermissionMode: bypassPermissions\n---\n", "bypassPermissions"),
        ("---\nname: x y\ndescription: d\n---\n", "not a usable agent name"),
    ],
)
async def test_broken_files_are_reported_with_file_and_problem(
    client: Client, project: Path, text: str, expected: str
) -> None:
    path = project / ".claude" / "agents" / "broken.md"
    path.write_text(text, encoding="utf-8")
    listing = await call(client, "list_agents")
    assert [p["file"] for p in listing["problems"]] == [str(path)]
    assert expected in listing["problems"][0]["error"]
    assert str(path) in listing["problems"][0]["error"]
    message = await call_error(client, "task_async", agent_definition="broken", prompt="hi")
    assert str(path) in message and expected in message


async def test_project_agents_win_over_user_agents_and_config_wins_over_both(
    client: Client, project: Path, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    write(settings.user_agent_dir / "helper.md", "---\nname: helper\ndescription: user copy\n---\n")
    write(project / ".claude" / "agents" / "helper.md", "---\nname: helper\ndescription: project copy\n---\n")
    write(settings.agent_dirs[0] / "extra.md", "---\nname: extra\ndescription: from agent_dirs\n---\n")
    with caplog.at_level(logging.WARNING):
        write(project / ".claude" / "agents" / "echo.md", "---\nname: echo\ndescription: shadowed\n---\n")
        listing = agents_by_name(await call(client, "list_agents"))
    assert listing["helper"]["description"] == "project copy"
    assert listing["extra"]["description"] == "from agent_dirs"
    assert listing["echo"]["source"] == "config"
    assert "shadowed by [agents.echo]" in caplog.text


async def test_edited_file_is_picked_up_without_restart(client: Client, project: Path) -> None:
    path = write(project / ".claude" / "agents" / "a.md", "---\nname: a\ndescription: first\n---\n")
    assert agents_by_name(await call(client, "list_agents"))["a"]["description"] == "first"
    path.write_text("---\nname: a\ndescription: second version\n---\n", encoding="utf-8")
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert agents_by_name(await call(client, "list_agents"))["a"]["description"] == "second version"


async def test_agent_by_path_only_inside_the_agent_folders(
    client: Client, project: Path, tmp_path: Path
) -> None:
    inside = write(
        project / ".claude" / "agents" / "team" / "writer.md", RESEARCHER.replace("researcher", "w")
    )
    outside = write(tmp_path / "elsewhere" / "evil.md", RESEARCHER.replace("researcher", "evil"))
    message = await call_error(client, "task_async", agent_definition=str(outside), prompt="hi")
    assert "outside the agent folders" in message and str(project / ".claude" / "agents") in message

    link = project / ".claude" / "agents" / "link.md"
    link.symlink_to(outside)
    message = await call_error(client, "task_async", agent_definition=str(link), prompt="hi")
    assert "outside the agent folders" in message
    message = await call_error(
        client, "task_async", agent_definition="../../../elsewhere/evil.md", prompt="hi"
    )
    assert "outside the agent folders" in message

    submitted = await submit(client, str(inside.relative_to(project)), "hello", max_retries=0)
    task = await wait_status(client, submitted["task_id"], "failed")  # no API key in tests: fails fast
    assert "ANTHROPIC_API_KEY" in task["error"]


async def test_unknown_agent_names_the_folders_searched(client: Client, project: Path) -> None:
    message = await call_error(client, "task_async", agent_definition="nobody", prompt="hi")
    assert "no agent named 'nobody'" in message
    assert str(project / ".claude" / "agents") in message
    assert "echo" in message


# ---- executor plugins ----------------------------------------------------------


PLUGIN = """
from sidequest.executors.base import ExecutionResult


class Shouter:
    name = "shout"

    def __init__(self, agent, options, settings):
        self.suffix = options.get("suffix", "!")

    async def run(self, prompt, ctx):
        return ExecutionResult(prompt.upper() + self.suffix)
"""


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real distribution on sys.path: importlib.metadata finds its entry point as it would after pip."""
    site = tmp_path / "site"
    (site / "shout_plugin.py").parent.mkdir(parents=True)
    (site / "shout_plugin.py").write_text(PLUGIN)
    info = site / "shout_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[sidequest.executors]\nshout = shout_plugin:Shouter\n")
    monkeypatch.syspath_prepend(str(site))


async def test_plugin_executor_from_an_entry_point(installed_plugin: None, tmp_path: Path) -> None:
    agents = {"loud": AgentConfig(executor="shout", options={"suffix": "!!"}, description="shouts")}
    settings = Settings(home=tmp_path / "h", agents=agents, user_agent_dir=tmp_path / "none")
    async with Engine(settings).running() as engine, Client(build_server(engine, str(tmp_path))) as client:
        listing = agents_by_name(await call(client, "list_agents"))
        assert listing["loud"]["executor"] == "shout"
        submitted = await submit(client, "loud", "quiet please")
        await wait_status(client, submitted["task_id"], "completed")
        page = await call(client, "get_task_result", task_id=submitted["task_id"])
        assert page["content"] == "QUIET PLEASE!!"


def test_unknown_executor_in_config_names_the_known_ones(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, agents={"x": AgentConfig(executor="nope", options={})})
    with pytest.raises(ConfigError, match=r"agents.x: unknown executor 'nope'; known: python, command"):
        AgentRegistry.from_settings(settings)


def test_config_rejects_keys_of_another_executor(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="argv is for executor 'command'"):
        AgentConfig(callable="a:b", argv=["x"])
    with pytest.raises(ValueError, match="defined in agent files"):
        AgentConfig(executor="anthropic")


async def test_an_agent_path_naming_an_unknown_users_home_is_a_clear_error(tmp_path: Path) -> None:
    from sidequest.agents import AgentLookupError, AgentRegistry

    registry = AgentRegistry.from_settings(Settings(home=tmp_path / "home"))
    with pytest.raises(AgentLookupError, match="nosuchuser"):
        registry.resolve("~nosuchuser_sidequest/agent.md", str(tmp_path))
