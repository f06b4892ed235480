"""The anthropic executor end to end: MCP tools, engine, real `anthropic` SDK, fake Messages API (HTTP)."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anthropic
import pytest
from conftest import all_test_agents, wait_for
from mcp import Client
from tools import call, submit, wait_status

from sidequest.config import AnthropicConfig, Settings
from sidequest.engine.engine import Engine
from sidequest.executors.anthropic import Sources
from sidequest.server.mcp import build_server
from sidequest.testing.fake_anthropic import (
    Cite,
    Error,
    FakeAnthropic,
    StreamError,
    Text,
    Usage,
    WebSearch,
)

RESEARCHER = """\
---
name: researcher
description: Finds and summarises sources on a topic.
tools: WebSearch
model: haiku
maxTurns: 3
---
You are a careful researcher. Cite every source.
"""

FAST_RETRY = {"initial": 0.05, "jitter": 0}


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(batch_delay=0.3) as server:
        yield server


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    agents = root / ".claude" / "agents"
    agents.mkdir(parents=True)
    (agents / "researcher.md").write_text(RESEARCHER)
    (agents / "batcher.md").write_text(
        RESEARCHER.replace("name: researcher", "name: batcher").replace(
            "---\nYou", "sidequest:\n  batch: true\n---\nYou"
        )
    )
    (agents / "plain.md").write_text("---\nname: plain\ndescription: no tools\nmaxTurns: 2\n---\nBe brief.\n")
    return root


@pytest.fixture
def settings(tmp_path: Path, fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("ANTHROPIC_API_KEY", fake.api_key)
    return Settings(
        home=tmp_path / "home",
        agents=all_test_agents(),
        user_agent_dir=tmp_path / "no-user-agents",
        anthropic=AnthropicConfig(base_url=fake.base_url, batch_poll_interval=0.05, max_retry_after=1.0),
        lease_seconds=2.0,
        shutdown_grace=1.0,
    )


@pytest.fixture
async def client(engine: Engine, project: Path) -> AsyncIterator[Client]:
    async with Client(build_server(engine, str(project))) as c:
        yield c


async def test_research_agent_from_file_completes_with_usage(client: Client, fake: FakeAnthropic) -> None:
    fake.on(
        "kittens",
        WebSearch("kitten sleep", text="Kittens sleep 16 hours a day [1].", usage=Usage(1000, 200, 300, 50)),
    )
    submitted = await submit(client, "researcher", "How long do kittens sleep?")
    task = await wait_status(client, submitted["task_id"], "completed")
    page = await call(client, "get_task_result", task_id=submitted["task_id"])
    assert page["content"] == "Kittens sleep 16 hours a day [1]."  # nothing cited: no sources list

    usage = task["usage"]
    assert usage["models"] == ["claude-haiku-5-5"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (1000, 200)
    assert (usage["cache_creation_input_tokens"], usage["cache_read_input_tokens"]) == (300, 50)
    # haiku list price $1/$5 per MTok, cache write 1.25x, read 0.1x, one search at $10 per 1000
    expected = (1000 * 1 + 200 * 5 + 300 * 1.25 + 50 * 0.1) / 1e6 + 0.01
    assert usage["cost_usd"] == pytest.approx(expected)

    [request] = fake.message_requests
    assert request.model == "claude-haiku-5-5"
    assert request.system_text == "You are a careful researcher. Cite every source."
    assert [t["name"] for t in request.tools] == ["web_search"]
    assert request.tools[0]["type"].startswith("web_search_")
    assert request.stream  # long agent turns are streamed
    assert request.headers.get("authorization") == f"Bearer {fake.api_key}"


async def test_rate_limit_retries_after_the_capped_retry_after(client: Client, fake: FakeAnthropic) -> None:
    # the server asks for an hour; the config caps it at 1 s, so the retry comes quickly
    fake.on("limit me", [Error(429, "slow down", retry_after=3600), Text("made it")])
    submitted = await submit(client, "plain", "limit me", retry_backoff=FAST_RETRY)
    task = await wait_status(client, submitted["task_id"], "completed", timeout=15)
    first, second = task["attempt_history"]
    assert first["status"] == "failed" and "429 rate_limit_error: slow down" in first["error"]
    gap = datetime.fromisoformat(second["started_at"]) - datetime.fromisoformat(first["finished_at"])
    assert 0.9 <= gap.total_seconds() < 30  # waited for retry-after (capped), not just the 50 ms backoff
    assert second["status"] == "completed"


async def test_bad_request_fails_at_once_with_the_api_message(client: Client, fake: FakeAnthropic) -> None:
    fake.on("malformed", Error(400, "messages: text content blocks must be non-empty"))
    submitted = await submit(client, "plain", "malformed", max_retries=3)
    task = await wait_status(client, submitted["task_id"], "failed")
    assert task["attempts"] == 1
    assert "400 invalid_request_error: messages: text content blocks must be non-empty" in task["error"]
    assert "request id" in task["error"]


async def test_overload_and_mid_stream_errors_are_retried(client: Client, fake: FakeAnthropic) -> None:
    fake.on("wobbly", [Error(529), StreamError(type="overloaded_error"), Text("steady now")])
    submitted = await submit(client, "plain", "wobbly", retry_backoff=FAST_RETRY)
    task = await wait_status(client, submitted["task_id"], "completed")
    errors = [a["error"] for a in task["attempt_history"][:2]]
    assert "529 overloaded_error" in errors[0]
    assert "stream error overloaded_error" in errors[1]


async def test_cancelling_a_slow_reply_aborts_the_request(client: Client, fake: FakeAnthropic) -> None:
    fake.on("take your time", Text("too late", delay=60))
    submitted = await submit(client, "plain", "take your time")
    await wait_for(lambda: _async(fake.message_requests), what="the request to reach the fake")
    await call(client, "cancel_task", task_id=submitted["task_id"])
    task = await wait_status(client, submitted["task_id"], "cancelled")
    assert task["status"] == "cancelled"
    await wait_for(
        lambda: _async(fake.message_requests[0].disconnected), timeout=5, what="the HTTP request to close"
    )


async def test_pause_turn_is_continued_and_max_turns_is_honoured(client: Client, fake: FakeAnthropic) -> None:
    fake.on("deep dive", [WebSearch("q1", text="Part one. ", stop_reason="pause_turn"), Text("Part two.")])
    submitted = await submit(client, "researcher", "deep dive")
    await wait_status(client, submitted["task_id"], "completed")
    page = await call(client, "get_task_result", task_id=submitted["task_id"])
    assert page["content"] == "Part one. Part two."
    _, second = fake.message_requests
    assert second.messages[-1]["role"] == "assistant"  # the paused turn went back to be continued
    assert second.messages[-1]["content"][0]["type"] == "server_tool_use"

    fake.on("endless", WebSearch("again", stop_reason="pause_turn"))
    submitted = await submit(client, "researcher", "endless", max_retries=0)
    task = await wait_status(client, submitted["task_id"], "failed")
    assert "used all 3 turns (maxTurns)" in task["error"]


async def test_missing_key_warns_at_submit_and_fails_fast(
    client: Client, fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    submitted = await submit(client, "plain", "hello", max_retries=3)
    assert any("ANTHROPIC_API_KEY is not set" in w for w in submitted["warnings"])
    task = await wait_status(client, submitted["task_id"], "failed")
    assert task["attempts"] == 1
    assert "no Anthropic API key: set ANTHROPIC_API_KEY" in task["error"]
    assert fake.message_requests == []


async def test_batch_agent_goes_through_the_batches_api_at_half_price(
    client: Client, fake: FakeAnthropic
) -> None:
    fake.on("cheap please", Text("batched answer", usage=Usage(1000, 100)))
    submitted = await submit(client, "batcher", "cheap please")
    task = await wait_status(client, submitted["task_id"], "completed")
    page = await call(client, "get_task_result", task_id=submitted["task_id"])
    assert page["content"] == "batched answer"
    assert page["sources"] == []  # nothing cited: an empty list, not a made-up one
    paths = [(r.method, r.path) for r in fake.requests]
    assert ("POST", "/v1/messages/batches") in paths
    assert not any(r.path == "/v1/messages" for r in fake.requests)  # nothing went the full-price way
    assert task["usage"]["cost_usd"] == pytest.approx((1000 * 1 + 100 * 5) / 1e6 / 2 + 0.0)

    # the per-task option sends a normal agent through batches too
    fake.on("also cheap", Text("also batched"))
    submitted = await submit(client, "plain", "also cheap", batch=True)
    await wait_status(client, submitted["task_id"], "completed")
    assert sum(1 for r in fake.requests if (r.method, r.path) == ("POST", "/v1/messages/batches")) == 2


KITTEN_RESULTS = [
    ("Sleep in cats", "https://cats.example/sleep"),
    ("Purring explained", "https://cats.example/purr"),
    ("Unrelated page", "https://cats.example/other"),
]
KITTEN_ANSWER = [
    "Kittens ",
    Cite("sleep 16 hours a day", "https://cats.example/sleep"),
    " and ",
    Cite("purr when content", "https://cats.example/purr", also=["https://cats.example/sleep"]),
    ". ",
    Cite("Older cats nap less. ", "https://cats.example/sleep"),
]
KITTEN_RESULT = """\
Kittens sleep 16 hours a day[1] and purr when content[2][1]. Older cats nap less.[1]

Sources:
[1] Sleep in cats — https://cats.example/sleep
[2] Purring explained — https://cats.example/purr"""


async def test_research_result_keeps_its_sources_numbered_and_referenced(
    client: Client, fake: FakeAnthropic
) -> None:
    # cited spans get [n] after them, numbered in order of first citation; a URL cited three times is
    # listed once; the search result nobody cited is left out
    fake.on("kittens sleep", WebSearch("kitten sleep", results=KITTEN_RESULTS, text=KITTEN_ANSWER))
    submitted = await submit(client, "researcher", "How long do kittens sleep?")
    await wait_status(client, submitted["task_id"], "completed")
    page = await call(client, "get_task_result", task_id=submitted["task_id"])
    assert page["content"] == KITTEN_RESULT
    assert fake.message_requests[0].stream
    # the structured result carries the same list, numbered as the markers in the text
    assert page["sources"] == [
        {"n": 1, "title": "Sleep in cats", "url": "https://cats.example/sleep"},
        {"n": 2, "title": "Purring explained", "url": "https://cats.example/purr"},
    ]
    second = await call(client, "get_task_result", task_id=submitted["task_id"], offset=10)
    assert second["sources"] == page["sources"]  # on every page, not only the first


async def test_sources_survive_pause_turn_and_batches(client: Client, fake: FakeAnthropic) -> None:
    # the continuation cites a page found before the pause: its title comes from that search result,
    # and numbering carries on across turns
    fake.on(
        "paused research",
        [
            WebSearch(
                "q",
                results=KITTEN_RESULTS,
                text=["First ", Cite("fact", KITTEN_RESULTS[1][1])],
                stop_reason="pause_turn",
            ),
            Text(
                [
                    ", then ",
                    Cite("another", KITTEN_RESULTS[0][1]),
                    " and ",
                    Cite("again", KITTEN_RESULTS[1][1]),
                ]
            ),
        ],
    )
    submitted = await submit(client, "researcher", "paused research")
    await wait_status(client, submitted["task_id"], "completed")
    page = await call(client, "get_task_result", task_id=submitted["task_id"])
    assert page["content"] == (
        "First fact[1], then another[2] and again[1]\n\nSources:\n"
        "[1] Purring explained — https://cats.example/purr\n[2] Sleep in cats — https://cats.example/sleep"
    )
    continued = fake.message_requests[1].messages[-1]["content"]
    assert continued[-1]["citations"][0]["type"] == "web_search_result_location"  # sent back as given

    fake.on("batched kittens", WebSearch("kitten sleep", results=KITTEN_RESULTS, text=KITTEN_ANSWER))
    submitted = await submit(client, "batcher", "batched kittens")
    await wait_status(client, submitted["task_id"], "completed")
    page = await call(client, "get_task_result", task_id=submitted["task_id"])
    assert page["content"] == KITTEN_RESULT


async def test_sources_structured_from_a_non_streamed_message(fake: FakeAnthropic) -> None:
    fake.on("kittens", WebSearch("kitten sleep", results=KITTEN_RESULTS, text=KITTEN_ANSWER))
    fake.on("plain", Text("Nothing cited here."))
    tools: Any = [{"type": "web_search_20250305", "name": "web_search"}]
    async with anthropic.AsyncAnthropic(base_url=fake.base_url, api_key=fake.api_key, max_retries=0) as api:
        cited = await api.messages.create(
            model="claude-haiku-5-5",
            max_tokens=100,
            tools=tools,
            messages=[{"role": "user", "content": "kittens"}],
        )
        plain = await api.messages.create(
            model="claude-haiku-5-5", max_tokens=100, messages=[{"role": "user", "content": "plain"}]
        )
    sources = Sources()
    assert sources.render("".join(sources.read(cited.content)).strip()) == KITTEN_RESULT
    assert sources.listed() == [
        {"n": 1, "title": "Sleep in cats", "url": "https://cats.example/sleep"},
        {"n": 2, "title": "Purring explained", "url": "https://cats.example/purr"},
    ]
    untouched = Sources()
    assert untouched.render("".join(untouched.read(plain.content))) == "Nothing cited here."
    assert untouched.listed() == []


async def _async(value: object) -> object:
    return value


def test_agent_file_warns_about_tools_it_cannot_run(tmp_path: Path) -> None:
    from sidequest.agents import AgentRegistry

    agents = tmp_path / "agents"
    agents.mkdir()
    (agents / "coder.md").write_text(
        textwrap.dedent("""\
        ---
        name: coder
        description: edits code
        tools: Read, Edit, WebSearch
        ---
        Write good code.
        """)
    )
    registry = AgentRegistry.from_settings(Settings(home=tmp_path, user_agent_dir=agents))
    [info] = registry.infos(None)
    assert info.executor == "anthropic"
    assert "Read, Edit need Claude Code" in info.warnings[0]
