"""The fake Anthropic API against the real clients: the `anthropic` SDK and the Claude Code CLI.

Other tests lean on the fake to stand in for the API, so these pin down that it speaks the protocol
the way the real clients expect (errors, streams, retries headers, batches) and that its scripting
does what its docs say.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anthropic
import anyio
import claude_agent_sdk
import pytest

from sidequest.testing.fake_anthropic import (
    Cite,
    Error,
    FakeAnthropic,
    RecordedRequest,
    StreamError,
    Text,
    ToolUse,
    Usage,
    WebSearch,
    parse_directives,
)

MODEL = "claude-sonnet-5-5"
CLAUDE_CLI = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"


@pytest.fixture(autouse=True)
def no_real_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in this module may reach the real API, whatever the developer's shell exports."""
    for key in list(os.environ):
        if key.startswith(("ANTHROPIC_", "CLAUDE_")):
            monkeypatch.delenv(key)


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


@pytest.fixture
async def api(fake: FakeAnthropic) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """A real SDK client pointed at the fake, closed inside the test's event loop."""
    async with anthropic.AsyncAnthropic(
        base_url=fake.base_url, api_key=fake.api_key, max_retries=0
    ) as client:
        yield client


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def raw_post(fake: FakeAnthropic, path: str, body: dict[str, Any], key: str | None) -> tuple[int, dict, str]:
    """A request without any SDK in the way, to see exactly what goes over the wire."""
    headers = {"content-type": "application/json", **({"x-api-key": key} if key else {})}
    request = urllib.request.Request(fake.base_url + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


async def test_plain_text_default_reply_and_recorded_request(
    fake: FakeAnthropic, api: anthropic.AsyncAnthropic
) -> None:
    message = await api.messages.create(
        model=MODEL,
        max_tokens=321,
        system="You are terse.",
        tools=[{"name": "lookup", "description": "look up", "input_schema": {"type": "object"}}],
        messages=user("hello there"),
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == "fake reply: hello there"
    assert (message.model, message.role, message.stop_reason, message.stop_sequence) == (
        MODEL,
        "assistant",
        "end_turn",
        None,
    )
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    [sent] = fake.message_requests
    assert (sent.model, sent.max_tokens, sent.system_text, sent.tool_names) == (
        MODEL,
        321,
        "You are terse.",
        ["lookup"],
    )
    assert sent.prompt_text == "hello there"
    assert sent.headers["authorization"] == f"Bearer {fake.api_key}"
    assert sent.status == 200 and not sent.stream


async def test_stream_text_deltas_and_final_usage(fake: FakeAnthropic, api: anthropic.AsyncAnthropic) -> None:
    long_text = "Kittens sleep for most of the day, and play the rest. " * 3
    usage = Usage(
        input_tokens=1200, output_tokens=80, cache_creation_input_tokens=300, cache_read_input_tokens=900
    )
    fake.on("kittens", Text(long_text, usage=usage))
    async with api.messages.stream(model=MODEL, max_tokens=1000, messages=user("research kittens")) as s:
        deltas = [text async for text in s.text_stream]
        final = await s.get_final_message()
    assert len(deltas) > 1 and "".join(deltas) == long_text
    assert final.usage.input_tokens == 1200 and final.usage.output_tokens == 80
    assert final.usage.cache_creation_input_tokens == 300 and final.usage.cache_read_input_tokens == 900
    assert fake.message_requests[0].stream


def test_every_sse_event_has_an_event_line(fake: FakeAnthropic) -> None:
    """The SDKs silently skip data-only events, so a fake that forgot `event:` would look like silence."""
    body = {"model": MODEL, "max_tokens": 10, "stream": True, "messages": user("hi")}
    status, headers, text = raw_post(fake, "/v1/messages?beta=true", body, fake.api_key)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [block.splitlines() for block in text.strip().split("\n\n")]
    assert all(lines[0].startswith("event: ") and lines[1].startswith("data: ") for lines in events)
    names = [lines[0].removeprefix("event: ") for lines in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert {"content_block_start", "content_block_delta", "content_block_stop"} <= set(names)
    assert headers["request-id"].startswith("req_")


async def test_tool_use_turn_then_text_after_tool_result(
    fake: FakeAnthropic, api: anthropic.AsyncAnthropic
) -> None:
    rule = fake.on(
        "weather", [ToolUse("get_weather", {"city": "Oslo"}, text="Checking."), Text("It is cold.")]
    )
    messages: list[dict[str, Any]] = user("what is the weather in Oslo?")
    async with api.messages.stream(model=MODEL, max_tokens=100, messages=messages) as s:
        first = await s.get_final_message()
    assert first.stop_reason == "tool_use"
    text_block, tool_block = first.content
    assert text_block.type == "text" and text_block.text == "Checking."
    assert (
        tool_block.type == "tool_use"
        and tool_block.name == "get_weather"
        and tool_block.input == {"city": "Oslo"}
    )
    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_block.id, "content": "-3 C"}],
        },
    ]
    second = await api.messages.create(model=MODEL, max_tokens=100, messages=messages)
    assert second.content[0].type == "text" and second.content[0].text == "It is cold."
    # The prompt stays the human's question through the loop, so one rule answers both requests.
    assert rule.hits == 2
    assert fake.message_requests[1].tool_results[0]["content"] == "-3 C"
    assert fake.message_requests[1].prompt_text == "what is the weather in Oslo?"


async def test_rate_limit_error_carries_retry_after(
    fake: FakeAnthropic, api: anthropic.AsyncAnthropic
) -> None:
    fake.on("busy", Error(429, retry_after=2))
    with pytest.raises(anthropic.RateLimitError) as caught:
        await api.messages.create(model=MODEL, max_tokens=10, messages=user("busy?"))
    error = caught.value
    assert error.response.headers["retry-after"] == "2"
    assert error.type == "rate_limit_error"
    assert error.request_id and error.request_id.startswith("req_")


@pytest.mark.parametrize(
    ("status", "exception", "error_type"),
    [
        (529, anthropic.OverloadedError, "overloaded_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
    ],
)
async def test_server_errors_map_to_sdk_exceptions(
    fake: FakeAnthropic,
    api: anthropic.AsyncAnthropic,
    status: int,
    exception: type[anthropic.APIStatusError],
    error_type: str,
) -> None:
    fake.on("x", Error(status))
    with pytest.raises(exception) as caught:
        await api.messages.create(model=MODEL, max_tokens=10, messages=user("x"))
    assert caught.value.status_code == status and caught.value.type == error_type


async def test_bad_request_message(fake: FakeAnthropic, api: anthropic.AsyncAnthropic) -> None:
    fake.on("long", Error(400, "prompt is too long: 300000 tokens > 200000 maximum"))
    with pytest.raises(anthropic.BadRequestError) as caught:
        await api.messages.create(model=MODEL, max_tokens=10, messages=user("long"))
    assert caught.value.api_message == "prompt is too long: 300000 tokens > 200000 maximum"
    assert caught.value.type == "invalid_request_error"


async def test_malformed_request_is_a_400(fake: FakeAnthropic, api: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="max_tokens: Field required"):
        await api.post("/v1/messages", body={"model": MODEL, "messages": user("x")}, cast_to=dict)


async def test_error_in_the_middle_of_a_stream(fake: FakeAnthropic, api: anthropic.AsyncAnthropic) -> None:
    fake.on("flaky", StreamError(type="overloaded_error", message="Overloaded", text="Half an ans"))
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with api.messages.stream(model=MODEL, max_tokens=100, messages=user("flaky")) as s:
            async for text in s.text_stream:
                seen.append(text)
    assert caught.value.status_code == 200 and caught.value.type == "overloaded_error"
    assert "".join(seen) == "Half an ans"
    # Without streaming there is no "middle": the same reply is a plain 529.
    with pytest.raises(anthropic.OverloadedError):
        await api.messages.create(model=MODEL, max_tokens=100, messages=user("flaky"))


async def test_slow_reply_is_aborted_by_a_cancel_scope(
    fake: FakeAnthropic, api: anthropic.AsyncAnthropic
) -> None:
    fake.on("slow", Text("too late", delay=30))
    started = time.monotonic()
    with anyio.move_on_after(10) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(api.messages.create, model=MODEL, max_tokens=10, messages=user("slow")))
            await fake.wait_for_request()
            tg.cancel_scope.cancel()
    assert not scope.cancelled_caught, "the cancel did not take"
    assert time.monotonic() - started < 5
    request = fake.message_requests[0]
    with anyio.fail_after(5):
        while not request.disconnected:  # the server notices the hang-up and stops waiting
            await anyio.sleep(0.02)
    assert request.status == 499


async def test_slow_stream_is_aborted_between_events(
    fake: FakeAnthropic, api: anthropic.AsyncAnthropic
) -> None:
    fake.on("drip", Text("one two three four five six seven eight nine ten" * 5, event_delay=0.3))
    received: list[str] = []
    with anyio.move_on_after(1.5):
        async with api.messages.stream(model=MODEL, max_tokens=100, messages=user("drip")) as s:
            async for text in s.text_stream:
                received.append(text)
    assert 0 < len(received) < 6
    request = fake.message_requests[0]
    with anyio.fail_after(5):
        while not request.disconnected:
            await anyio.sleep(0.02)


async def test_stop_reasons_max_tokens_and_pause_turn(
    fake: FakeAnthropic, api: anthropic.AsyncAnthropic
) -> None:
    fake.on("cut", Text("I was going to say", stop_reason="max_tokens"))
    fake.on("pause", Text("Still searching", stop_reason="pause_turn"))
    cut = await api.messages.create(model=MODEL, max_tokens=5, messages=user("cut"))
    async with api.messages.stream(model=MODEL, max_tokens=5, messages=user("pause")) as s:
        paused = await s.get_final_message()
    assert (cut.stop_reason, paused.stop_reason) == ("max_tokens", "pause_turn")


async def test_web_search_blocks_need_a_web_search_tool(
    fake: FakeAnthropic, api: anthropic.AsyncAnthropic
) -> None:
    fake.on(
        "news", WebSearch("kitten news", results=[("Kitten daily", "https://kittens.example/")], text="Cute.")
    )
    tools: Any = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]
    async with api.messages.stream(model=MODEL, max_tokens=100, tools=tools, messages=user("news")) as s:
        message = await s.get_final_message()
    use, result, text = message.content
    assert use.type == "server_tool_use" and use.input == {"query": "kitten news"}
    assert result.type == "web_search_tool_result" and result.tool_use_id == use.id
    assert isinstance(result.content, list) and result.content[0].url == "https://kittens.example/"
    assert text.type == "text" and text.text == "Cute."
    assert (
        message.usage.server_tool_use is not None and message.usage.server_tool_use.web_search_requests == 1
    )
    with pytest.raises(anthropic.BadRequestError, match="web_search"):
        await api.messages.create(model=MODEL, max_tokens=100, messages=user("news"))


async def test_cited_text_after_a_search_streamed_plain_and_batched(
    fake: FakeAnthropic, api: anthropic.AsyncAnthropic
) -> None:
    results = [("Kitten daily", "https://kittens.example/"), ("Cat facts", "https://cats.example/")]
    answer = [
        "Kittens ",
        Cite("sleep a lot", "https://kittens.example/", also=["https://cats.example/"]),
        ".",
    ]
    fake.on("news", WebSearch("kitten news", results=results, text=answer))
    tools: Any = [{"type": "web_search_20250305", "name": "web_search"}]
    request: Any = {"model": MODEL, "max_tokens": 100, "tools": tools, "messages": user("news")}
    async with api.messages.stream(**request) as s:
        streamed = await s.get_final_message()
    plain = await api.messages.create(**request)
    batch = await api.messages.batches.create(requests=[{"custom_id": "b", "params": request}])
    [entry] = [r async for r in await api.messages.batches.results(batch.id)]
    assert entry.result.type == "succeeded"
    for message in (streamed, plain, entry.result.message):
        _, _, before, cited, after = message.content
        assert (before.text, before.citations) == ("Kittens ", None)
        assert cited.type == "text" and cited.text == "sleep a lot" and after.text == "."
        assert cited.citations is not None
        first, second = cited.citations
        assert first.type == "web_search_result_location"
        assert (first.url, first.title, first.cited_text) == (
            "https://kittens.example/",
            "Kitten daily",
            "sleep a lot",
        )
        assert (second.url, second.title) == ("https://cats.example/", "Cat facts")
    assert [b.model_dump() for b in streamed.content[2:]] == [b.model_dump() for b in plain.content[2:]]

    # Text replies cite too (a turn after a paused search); an unknown URL is its own title
    fake.on("later", Text([Cite("Sure.", "https://elsewhere.example/", cited_text="quoted")]))
    [block] = (await api.messages.create(model=MODEL, max_tokens=10, messages=user("later"))).content
    assert block.citations is not None
    assert (
        block.citations[0].title == "https://elsewhere.example/" and block.citations[0].cited_text == "quoted"
    )


async def test_cited_search_directive(fake: FakeAnthropic, api: anthropic.AsyncAnthropic) -> None:
    prompt = (
        'find [[fake:search="kittens" results=[["Kitten daily","https://kittens.example/"]] '
        'text=["Kittens ", {"text": "nap", "url": "https://kittens.example/"}, "."] stop=pause_turn]]'
    )
    tools: Any = [{"type": "web_search_20250305", "name": "web_search"}]
    message = await api.messages.create(model=MODEL, max_tokens=10, tools=tools, messages=user(prompt))
    assert message.stop_reason == "pause_turn"
    _, result, _, cited, _ = message.content
    assert result.type == "web_search_tool_result" and isinstance(result.content, list)
    assert result.content[0].title == "Kitten daily"
    assert cited.type == "text" and cited.citations is not None
    assert (cited.citations[0].url, cited.citations[0].title) == ("https://kittens.example/", "Kitten daily")
    parts = await api.messages.create(model=MODEL, max_tokens=10, messages=user('[[fake:text=["a", "b"]]]'))
    assert [b.text for b in parts.content if b.type == "text"] == ["a", "b"]
    for bad in ('[[fake:search="k" results=["x"]]]', '[[fake:text=[{"text": "x"}]]]'):
        with pytest.raises(anthropic.BadRequestError, match="fake:"):
            await api.messages.create(model=MODEL, max_tokens=10, tools=tools, messages=user(bad))


async def test_rules_sequences_expiry_and_conditions(
    fake: FakeAnthropic, api: anthropic.AsyncAnthropic
) -> None:
    flaky = fake.on("report", [Error(529), Text("report v1")], times=2)
    fake.on("report", Text("report from the second rule"))
    fake.on(model="haiku", replies=Text("a title"))
    fake.on(system="reviewer", replies=lambda req: Text(f"reviewed {len(req.messages)} messages"))

    async def ask(prompt: str, model: str = MODEL, **kw: Any) -> str:
        try:
            message = await api.messages.create(model=model, max_tokens=10, messages=user(prompt), **kw)
        except anthropic.APIStatusError as e:
            return str(e.status_code)
        block = message.content[0]
        return block.text if block.type == "text" else block.type

    assert [await ask("write the report") for _ in range(3)] == [
        "529",
        "report v1",
        "report from the second rule",
    ]
    assert flaky.expired and flaky.hits == 2
    assert await ask("name this chat", model="claude-haiku-5-5") == "a title"
    assert await ask("check it", system="You are a reviewer.") == "reviewed 1 messages"
    assert await ask("anything else") == "fake reply: anything else"
    assert fake.message_requests[-1].reply == Text()


def test_matching_uses_the_prompt_not_reminders_or_tool_results() -> None:
    request = RecordedRequest(
        "POST",
        "/v1/messages",
        "",
        {},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "<system-reminder>today is Monday</system-reminder>"},
                        {"type": "text", "text": "summarise the logs"},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "Read", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ERROR x"}],
                },
            ]
        },
        0.0,
        "req_1",
    )
    assert request.prompt_text == "summarise the logs"
    assert request.last_user_text == "ERROR x"
    assert "today is Monday" in request.conversation_text and "ERROR x" in request.conversation_text


def test_directive_syntax() -> None:
    [error, slow, tool, text] = parse_directives(
        "go [[fake:error=429 retry_after=2 times=1]] [[fake:delay=0.5 event_delay=0.1]]"
        ' [[fake:tool=Write {"file_path": "/tmp/x]]", "content": "y"}]]'
        ' [[fake:text="all done" stop=max_tokens]]'
    )
    assert error.reply == Error(429, retry_after=2.0) and error.times == 1
    assert slow.reply == Text(delay=0.5, event_delay=0.1) and slow.times is None
    assert tool.reply == ToolUse("Write", {"file_path": "/tmp/x]]", "content": "y"}) and tool.times == 1
    assert text.reply == Text("all done", stop_reason="max_tokens")
    with pytest.raises(ValueError, match="bad fake directive"):
        parse_directives("[[fake:oops]]")


async def test_directives_in_the_prompt_count_per_server(
    fake: FakeAnthropic, api: anthropic.AsyncAnthropic
) -> None:
    prompt = 'build it [[fake:error=429 retry_after=1 times=1]] [[fake:tool=Bash {"command": "make"}]]'
    with pytest.raises(anthropic.RateLimitError) as caught:
        await api.messages.create(model=MODEL, max_tokens=10, messages=user(prompt))
    assert caught.value.response.headers["retry-after"] == "1"
    second = await api.messages.create(model=MODEL, max_tokens=10, messages=user(prompt))
    assert second.stop_reason == "tool_use" and second.content[0].type == "tool_use"
    assert second.content[0].input == {"command": "make"}
    third = await api.messages.create(model=MODEL, max_tokens=10, messages=user(prompt))
    assert third.content[0].type == "text" and third.content[0].text == "fake reply: build it"
    with pytest.raises(anthropic.BadRequestError, match="bad fake directive"):
        await api.messages.create(model=MODEL, max_tokens=10, messages=user("[[fake:oops]]"))


async def test_batches_round_trip(fake: FakeAnthropic, api: anthropic.AsyncAnthropic) -> None:
    fake.batch_delay = 0.3
    fake.on("fail me", Error(500, "boom"))
    params: Any = {"model": MODEL, "max_tokens": 10}
    batch = await api.messages.batches.create(
        requests=[
            {"custom_id": "ok", "params": {**params, "messages": user("first")}},
            {"custom_id": "bad", "params": {**params, "messages": user("fail me")}},
        ]
    )
    assert batch.processing_status == "in_progress" and batch.request_counts.processing == 2
    assert batch.results_url is None
    with anyio.fail_after(5):
        while (batch := await api.messages.batches.retrieve(batch.id)).processing_status != "ended":
            await anyio.sleep(0.05)
    assert (batch.request_counts.succeeded, batch.request_counts.errored) == (1, 1)
    results = {r.custom_id: r.result async for r in await api.messages.batches.results(batch.id)}
    ok, bad = results["ok"], results["bad"]
    assert ok.type == "succeeded" and ok.message.content[0].type == "text"
    assert ok.message.content[0].text == "fake reply: first"
    assert bad.type == "errored" and bad.error.error.message == "boom"

    doomed = await api.messages.batches.create(
        requests=[{"custom_id": "a", "params": {**params, "messages": user("x")}}]
    )
    assert (await api.messages.batches.cancel(doomed.id)).processing_status == "canceling"
    doomed = await api.messages.batches.retrieve(doomed.id)
    assert doomed.processing_status == "ended" and doomed.request_counts.canceled == 1
    with pytest.raises(anthropic.NotFoundError):
        await api.messages.batches.retrieve("msgbatch_nope")


def test_auth_count_tokens_and_unknown_paths(fake: FakeAnthropic) -> None:
    body = {"model": MODEL, "max_tokens": 10, "messages": user("hi")}
    status, headers, text = raw_post(fake, "/v1/messages", body, key=None)
    assert status == 401 and json.loads(text)["error"]["type"] == "authentication_error"
    assert headers["request-id"].startswith("req_")
    status, _, text = raw_post(fake, "/v1/messages/count_tokens", body, fake.api_key)
    assert status == 200 and json.loads(text)["input_tokens"] > 0
    status, _, text = raw_post(fake, "/v1/complete", body, fake.api_key)
    assert status == 404 and json.loads(text) == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "fake Anthropic API has no POST /v1/complete"},
        "request_id": fake.requests[-1].request_id,
    }
    assert [r.path for r in fake.unhandled] == ["/v1/complete"]


def test_runs_from_the_command_line(tmp_path: Path) -> None:
    """`python -m sidequest.testing.fake_anthropic` prints where it listens and answers there."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sidequest.testing.fake_anthropic"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().split()[-1]
        sync_client = anthropic.Anthropic(base_url=base_url, api_key="anything", max_retries=0)
        message = sync_client.messages.create(model=MODEL, max_tokens=10, messages=user("by hand"))
        assert message.content[0].type == "text" and message.content[0].text == "fake reply: by hand"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_claude_code_cli_runs_a_tool_turn_against_the_fake(fake: FakeAnthropic, tmp_path: Path) -> None:
    """The real bundled `claude -p` works offline against the fake: a Write tool call, then an answer."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    target = work / "hello.txt"
    fake.on(
        "make the greeting file",
        [ToolUse("Write", {"file_path": str(target), "content": "hi\n"}), Text("Done.")],
    )
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        **fake.env(),
    }
    command = [str(CLAUDE_CLI), "-p", "please make the greeting file", "--output-format", "json"]
    command += ["--permission-mode", "acceptEdits", "--model", "sonnet", "--max-turns", "3"]
    started = time.monotonic()
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["result"], result["is_error"], result["subtype"], result["num_turns"]) == (
        "Done.",
        False,
        "success",
        2,
    )
    assert result["session_id"] and result["total_cost_usd"] > 0
    assert target.read_text() == "hi\n"
    first, second = fake.message_requests
    assert first.model == second.model == "claude-sonnet-5-5" and first.stream
    assert first.headers["x-api-key"] == fake.api_key and first.query == "beta=true"
    assert second.tool_results and "hello.txt" in str(second.tool_results[0]["content"])
    assert not fake.unhandled
    assert time.monotonic() - started < 20
