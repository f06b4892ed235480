"""A fake Anthropic Messages API: a real HTTP server on 127.0.0.1 for tests and trying sidequest offline.

Why a real server and not a mocked client: the code under test talks to Anthropic through two very
different clients, the `anthropic` Python SDK and the Claude Code CLI (a separate binary). Both only
need `ANTHROPIC_BASE_URL` to be pointed here, so tests exercise the real wire protocol, retries,
streaming and cancellation without a network or an API key.

    with FakeAnthropic() as fake:
        fake.on("research kittens", [Text("Kittens sleep a lot.")])
        client = anthropic.Anthropic(base_url=fake.base_url, api_key=fake.api_key, max_retries=0)
        ...
        assert fake.message_requests[-1].model == "claude-sonnet-5-5"

Replies are chosen, per POST /v1/messages, in this order:

1. rules added with `fake.on(...)`, in the order they were added; the first live rule whose conditions
   all hold answers. A rule holds a sequence of replies consumed one per matching request; the last
   reply then repeats. `times=N` makes the rule expire after N matches (then later rules, directives
   and the default get their turn).
2. directives written in the prompt itself, `[[fake:...]]` (see `parse_directives`), for by-hand and
   subprocess use where a test cannot reach the server object;
3. the default: `Text("fake reply: <first 200 chars of the prompt>")` with plausible usage.

"The prompt" (`RecordedRequest.prompt_text`) is the text of the latest user turn typed by a human:
the last user message that has text blocks other than tool results and `<system-reminder>` blocks.
It stays the same through a tool loop (tool results come back as later user messages), so one rule
keeps matching every request of an agent turn, and it changes when a resumed session sends a new
prompt. One catch: after a `max_tokens` stop or an error in the middle of a stream, the Claude Code
CLI continues by itself with a user message of its own ("Output token limit hit. Resume directly…"),
which becomes the prompt; match those conversations with `in_conversation=` instead of `contains=`.

Run `python -m sidequest.testing.fake_anthropic` to serve it in the foreground.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DEFAULT_API_KEY = "sk-ant-fake-0000"
"""Any non-empty key is accepted; this one is what `fake.api_key` hands to clients."""

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
"""The `error.type` the real API sends with each status, used when a reply does not name one."""

_STATUS_FOR_TYPE: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


# --------------------------------------------------------------------------------------------------
# Replies


@dataclass(frozen=True)
class Usage:
    """Token counts to report. `None` means "estimate from the request / reply", like a plausible API."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


@dataclass(frozen=True)
class Reply:
    """Base of every reply kind: timing knobs that any reply can carry.

    `delay` holds the response back before anything is sent (a slow first byte); `event_delay` is slept
    between SSE events of a streamed reply (a slow stream). Both notice a client that hangs up and stop,
    so a test can check that cancelling a request really closes the connection (see
    `RecordedRequest.disconnected`).
    """

    _: KW_ONLY
    delay: float = 0.0
    event_delay: float = 0.0


@dataclass(frozen=True)
class Text(Reply):
    """A plain assistant text turn. Set `stop_reason` to "max_tokens", "pause_turn", "refusal", …

    `text=None` answers with the default "fake reply: <prompt>" text. `text` may mix strings and `Cite`
    spans (e.g. the turn after a paused search citing what it found).
    """

    text: TextParts | None = None
    stop_reason: str = "end_turn"
    usage: Usage | None = None


@dataclass(frozen=True)
class ToolUse(Reply):
    """The model asks the client to run a tool (stop_reason "tool_use"), optionally after some text."""

    name: str
    input: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    id: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class Cite:
    """A span of answer text that cites web pages: one text block with `web_search_result_location`
    citations, the way the API answers after a web search.

    Use it in the `text` of a `WebSearch` or `Text` reply, between plain strings:
    `WebSearch("kittens", results=[(title, url)], text=["Kittens ", Cite("sleep a lot", url), "."])`.
    `title=None` takes the title of the search result with that URL in the same reply (else the URL);
    `also` lists more URLs the same span cites.
    """

    text: str
    url: str
    title: str | None = None
    cited_text: str | None = None
    also: Sequence[str] = ()


TextParts = str | Sequence[str | Cite]
"""Answer text: one string (one text block), or parts where each `Cite` becomes a cited text block."""


@dataclass(frozen=True)
class WebSearch(Reply):
    """A server-side web search: server_tool_use + web_search_tool_result blocks, then `text`.

    Only valid when the request offers a web search tool (`{"type": "web_search_…"}`); otherwise the
    fake answers 400, because the real API would never produce these blocks and the test is wrong.
    `stop_reason="pause_turn"` models a long server-tool turn the API paused. `text` may mix plain
    strings and `Cite` spans (text blocks with citations, streamed as `citations_delta` events).
    """

    query: str
    results: Sequence[tuple[str, str]] = (("Example result", "https://example.com/"),)
    text: TextParts = "Here is what I found."
    stop_reason: str = "end_turn"
    usage: Usage | None = None


@dataclass(frozen=True)
class Error(Reply):
    """An HTTP error response before any streaming starts (what 429/529/5xx/4xx look like for real).

    `type` defaults to the API's type for `status` (see ERROR_TYPES); `retry_after` sets the
    `retry-after` header in seconds.
    """

    status: int
    message: str = ""
    type: str | None = None
    retry_after: float | None = None

    @property
    def error_type(self) -> str:
        return self.type or ERROR_TYPES.get(self.status, "api_error")

    @property
    def error_message(self) -> str:
        return self.message or f"fake {self.error_type} ({self.status})"


@dataclass(frozen=True)
class StreamError(Reply):
    """A stream that starts fine (status 200, some text) and then sends `event: error`.

    The Python SDK raises `APIStatusError` with status 200 and `e.type == type`. A non-streaming request
    gets a plain HTTP error instead, with the status that matches `type` (overloaded_error → 529).
    """

    type: str = "overloaded_error"
    message: str = "Overloaded"
    text: str = "partial answer "


ReplyLike = Reply | Callable[["RecordedRequest"], Reply]
"""A reply, or a function of the request that returns one (to echo tool results, count calls, …)."""


# --------------------------------------------------------------------------------------------------
# Recorded requests


def _block_text(block: Any) -> str:
    """Text of one content block: text blocks, and tool_result content (string or text blocks)."""
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return ""
    if block.get("type") == "text":
        return str(block.get("text", ""))
    if block.get("type") == "tool_result":
        return _content_text(block.get("content"))
    return ""


def _content_text(content: Any) -> str:
    """Text of a message's `content`, which the API accepts as a string or a list of blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(t for t in (_block_text(b) for b in content) if t)
    return ""


def _human_text(content: Any) -> str:
    """The typed part of a user message: text blocks that are neither tool results nor reminders.

    Claude Code wraps context it injects (CLAUDE.md, dates, todo nags) in <system-reminder> blocks;
    leaving them out keeps the prompt what the user wrote.
    """
    if isinstance(content, str):
        return "" if content.lstrip().startswith("<system-reminder>") else content
    if not isinstance(content, list):
        return ""
    texts = [
        str(b.get("text", ""))
        for b in content
        if isinstance(b, dict)
        and b.get("type") == "text"
        and not str(b.get("text", "")).lstrip().startswith("<system-reminder>")
    ]
    return "\n".join(t for t in texts if t)


@dataclass
class RecordedRequest:
    """One HTTP request the fake received, as tests want to see it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    time: float
    request_id: str
    status: int | None = None
    """The status the fake answered with (None while in flight)."""
    disconnected: bool = False
    """True when the client hung up before the reply was complete (e.g. a cancelled request)."""
    reply: Reply | None = None
    """What the fake chose to answer (messages requests only)."""

    @property
    def is_message(self) -> bool:
        """A POST /v1/messages call (the ones scripts answer)."""
        return self.method == "POST" and self.path == "/v1/messages"

    @property
    def model(self) -> str | None:
        return self.body.get("model") if isinstance(self.body, dict) else None

    @property
    def max_tokens(self) -> int | None:
        return self.body.get("max_tokens") if isinstance(self.body, dict) else None

    @property
    def stream(self) -> bool:
        return bool(isinstance(self.body, dict) and self.body.get("stream"))

    @property
    def messages(self) -> list[dict[str, Any]]:
        msgs = self.body.get("messages") if isinstance(self.body, dict) else None
        return msgs if isinstance(msgs, list) else []

    @property
    def tools(self) -> list[dict[str, Any]]:
        tools = self.body.get("tools") if isinstance(self.body, dict) else None
        return tools if isinstance(tools, list) else []

    @property
    def tool_names(self) -> list[str]:
        return [str(t.get("name")) for t in self.tools if isinstance(t, dict)]

    @property
    def system_text(self) -> str:
        """The system prompt as one string (the API takes a string or a list of text blocks)."""
        system = self.body.get("system") if isinstance(self.body, dict) else None
        return _content_text(system)

    @property
    def user_messages(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if isinstance(m, dict) and m.get("role") == "user"]

    @property
    def last_user_text(self) -> str:
        """Text of the last user message, tool results included."""
        users = self.user_messages
        return _content_text(users[-1].get("content")) if users else ""

    @property
    def prompt_text(self) -> str:
        """The latest human-typed user text: stable through a tool loop (see the module docstring)."""
        for message in reversed(self.user_messages):
            text = _human_text(message.get("content"))
            if text:
                return text
        return ""

    @property
    def conversation_text(self) -> str:
        """Every user and assistant text in the conversation, tool results included."""
        return "\n".join(_content_text(m.get("content")) for m in self.messages if isinstance(m, dict))

    @property
    def tool_results(self) -> list[dict[str, Any]]:
        """The tool_result blocks of the last user message (what the client sends after a ToolUse)."""
        users = self.user_messages
        content = users[-1].get("content") if users else None
        if not isinstance(content, list):
            return []
        return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]

    @property
    def has_web_search(self) -> bool:
        return any(str(t.get("type", "")).startswith("web_search") for t in self.tools if isinstance(t, dict))


# --------------------------------------------------------------------------------------------------
# Rules and directives


@dataclass
class Rule:
    """A scripted answer: conditions on the request plus the replies to give, one per match.

    All given conditions must hold. `contains` is looked for in `prompt_text`, `in_conversation` in
    `conversation_text`, `system` in the system prompt, `model` in the model name; `match` is any
    predicate. After the sequence is used up the last reply repeats; with `times` the rule expires
    after that many matches.
    """

    replies: list[ReplyLike]
    contains: str | None = None
    in_conversation: str | None = None
    system: str | None = None
    model: str | None = None
    match: Callable[[RecordedRequest], bool] | None = None
    times: int | None = None
    requests: list[RecordedRequest] = field(default_factory=list)
    """The requests this rule answered, in order."""

    @property
    def hits(self) -> int:
        return len(self.requests)

    @property
    def expired(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, request: RecordedRequest) -> bool:
        checks = (
            (self.contains, request.prompt_text),
            (self.in_conversation, request.conversation_text),
            (self.system, request.system_text),
            (self.model, request.model or ""),
        )
        if any(needle is not None and needle not in haystack for needle, haystack in checks):
            return False
        return self.match is None or self.match(request)

    def take(self, request: RecordedRequest) -> Reply:
        """The reply for this (matching) request; records it as a hit."""
        reply = self.replies[min(self.hits, len(self.replies) - 1)]
        self.requests.append(request)
        return reply(request) if callable(reply) else reply


_DIRECTIVE_START = "[[fake:"
_KEY_RE = re.compile(r"\s*([a-z_]+)=")


@dataclass(frozen=True)
class Directive:
    """One `[[fake:...]]` directive parsed from a prompt (see `parse_directives`)."""

    source: str
    """The directive's text, which is also its key for counting `times` on one server."""
    reply: Reply
    times: int | None


def _parse_value(text: str, pos: int) -> tuple[Any, int]:
    """A directive value at `pos`: JSON when it starts with `"`, `{` or `[`, else up to whitespace or `]]`."""
    if pos < len(text) and text[pos] in '"{[':
        return json.JSONDecoder().raw_decode(text, pos)
    end = pos
    while end < len(text) and not text[end].isspace() and not text.startswith("]]", end):
        end += 1
    return text[pos:end], end


def _parse_one(text: str, start: int) -> tuple[dict[str, Any], int]:
    """Parse `key=value` items from just after `[[fake:` up to the closing `]]`; returns items and end."""
    items: dict[str, Any] = {}
    pos = start
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if text.startswith("]]", pos):
            return items, pos + 2
        m = _KEY_RE.match(text, pos)
        if not m:
            raise ValueError(f"bad fake directive near {text[pos : pos + 30]!r}")
        key = m.group(1)
        value, pos = _parse_value(text, m.end())
        if key == "tool":
            # `tool=Name {json input}`: the input object may follow the name after a space.
            rest = pos
            while rest < len(text) and text[rest] == " ":
                rest += 1
            if text.startswith("{", rest):
                items["input"], pos = json.JSONDecoder().raw_decode(text, rest)
        items[key] = value


def _directive_reply(items: dict[str, Any]) -> tuple[Reply, int | None]:
    """Turn parsed directive items into a reply and its `times` (tools default to once, see below)."""
    timing = {"delay": float(items.get("delay", 0)), "event_delay": float(items.get("event_delay", 0))}
    usage = None
    if any(k in items for k in ("input_tokens", "output_tokens", "cache_creation", "cache_read")):
        usage = Usage(
            input_tokens=int(items["input_tokens"]) if "input_tokens" in items else None,
            output_tokens=int(items["output_tokens"]) if "output_tokens" in items else None,
            cache_creation_input_tokens=int(items.get("cache_creation", 0)),
            cache_read_input_tokens=int(items.get("cache_read", 0)),
        )
    times = int(items["times"]) if "times" in items else None
    reply: Reply
    if "error" in items:
        retry_after = float(items["retry_after"]) if "retry_after" in items else None
        reply = Error(
            int(items["error"]),
            message=str(items.get("message", "")),
            type=items.get("type"),
            retry_after=retry_after,
            **timing,
        )
    elif "stream_error" in items:
        reply = StreamError(
            type=str(items["stream_error"]), message=str(items.get("message", "Overloaded")), **timing
        )
    elif "tool" in items:
        text = str(items.get("text", ""))
        reply = ToolUse(str(items["tool"]), dict(items.get("input", {})), text=text, usage=usage, **timing)
        # A tool call that repeated forever would loop an agent until max_turns: once unless told.
        times = 1 if times is None else times
    elif "search" in items:
        extra: dict[str, Any] = {}
        if "results" in items:
            results = items["results"]
            if not isinstance(results, list) or not all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in results
            ):
                raise ValueError('search results must be a JSON list of ["title", "url"] pairs')
            extra["results"] = [tuple(r) for r in results]
        reply = WebSearch(
            str(items["search"]),
            text=_directive_text(items.get("text", "Here is what I found.")),
            stop_reason=str(items.get("stop", "end_turn")),
            usage=usage,
            **extra,
            **timing,
        )
    else:
        stop = str(items.get("stop", "end_turn"))
        text = _directive_text(items["text"]) if "text" in items else None
        reply = Text(text, stop_reason=stop, usage=usage, **timing)
    return reply, times


def _directive_text(value: Any) -> TextParts:
    """A directive's `text=`: a string, or a JSON list of strings and cited spans
    (`{"text": "…", "url": "…", "title": "…"}`, optional `cited_text`, `also`)."""
    if not isinstance(value, list):
        return str(value)
    parts: list[str | Cite] = []
    for part in value:
        if isinstance(part, str):
            parts.append(part)
        elif (
            isinstance(part, dict) and isinstance(part.get("text"), str) and isinstance(part.get("url"), str)
        ):
            unknown = set(part) - {"text", "url", "title", "cited_text", "also"}
            if unknown:
                raise ValueError(f"unknown keys in a cited text part: {', '.join(sorted(unknown))}")
            parts.append(Cite(**{**part, "also": tuple(part.get("also", ()))}))
        else:
            raise ValueError('text parts must be strings or {"text": "…", "url": "…"} objects')
    return parts


def parse_directives(text: str) -> list[Directive]:
    """Find `[[fake:key=value ...]]` directives in prompt text.

    Values are bare words (up to whitespace or `]]`) or JSON (`"quoted text"`, `{...}`). Keys:

    - `text="..."`: reply with this text (without it: the default "fake reply: …" text);
      `stop=max_tokens|pause_turn|refusal` sets the stop reason;
    - `tool=Name {"json": "input"}`: ask for a client tool call, once by default (`text=` adds a
      preamble);
    - `search="query"`: a server-side web search turn (needs a web search tool in the request);
      `results=[["title", "url"], …]` sets its results, `stop=pause_turn` pauses it;
    - `text=["plain ", {"text": "cited span", "url": "https://…"}, "."]` (with `text=` or `search=`):
      text blocks, each object one with a web search citation (`title`, `cited_text`, `also` optional);
    - `error=429 [type=rate_limit_error] [message="..."] [retry_after=2]`: an HTTP error;
    - `stream_error=overloaded_error [message="..."]`: an `event: error` in the middle of a stream;
    - `delay=SECONDS`, `event_delay=SECONDS`: slow down any of the above (alone: a slow default reply);
    - `input_tokens=N output_tokens=N cache_creation=N cache_read=N`: usage numbers;
    - `times=N`: use this directive for N requests, counted per server by the directive's exact text;
      afterwards the next directive in the prompt (or the default reply) answers. Without `times` a
      directive applies to every request, except `tool=` which applies once.

    Example: `Write the file [[fake:tool=Write {"file_path":"/tmp/x","content":"y"}]] [[fake:text="done"]]`.
    """
    directives = []
    for start, end, items in _directive_spans(text):
        reply, times = _directive_reply(items)
        directives.append(Directive(text[start:end], reply, times))
    return directives


def _directive_spans(text: str) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(start, end, items) of each directive; a real parse, since JSON values may contain "]]"."""
    pos = text.find(_DIRECTIVE_START)
    while pos >= 0:
        items, end = _parse_one(text, pos + len(_DIRECTIVE_START))
        yield pos, end, items
        pos = text.find(_DIRECTIVE_START, end)


def strip_directives(text: str) -> str:
    """The prompt without its directives, for echoing it back in the default reply."""
    out, pos = [], 0
    with contextlib.suppress(ValueError):  # a broken directive stays in the echo, visibly
        for start, end, _ in _directive_spans(text):
            out.append(text[pos:start])
            pos = end
    out.append(text[pos:])
    return " ".join("".join(out).split())


# --------------------------------------------------------------------------------------------------
# Message building


def _estimate_tokens(value: Any) -> int:
    """About four characters per token: plausible enough for cost and context-size code paths."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return max(1, len(text) // 4)


def _input_tokens(request: RecordedRequest) -> int:
    body = request.body if isinstance(request.body, dict) else {}
    return _estimate_tokens({k: body.get(k) for k in ("system", "messages", "tools")})


def _usage_json(
    usage: Usage | None, request: RecordedRequest, content: list[dict[str, Any]]
) -> dict[str, Any]:
    usage = usage or Usage()
    out: dict[str, Any] = {
        "input_tokens": usage.input_tokens if usage.input_tokens is not None else _input_tokens(request),
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "output_tokens": usage.output_tokens
        if usage.output_tokens is not None
        else _estimate_tokens(content),
        "service_tier": "standard",
    }
    searches = sum(1 for b in content if b.get("type") == "server_tool_use")
    if searches:
        out["server_tool_use"] = {"web_search_requests": searches, "web_fetch_requests": 0}
    return out


@dataclass
class _Message:
    """A complete assistant message, ready to be sent as JSON or as a stream of SSE events."""

    body: dict[str, Any]

    def sse_events(self, fail: StreamError | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event name, data) pairs in the order the real API streams them."""
        start = {**self.body, "content": [], "stop_reason": None, "stop_sequence": None}
        start["usage"] = {**self.body["usage"], "output_tokens": 1}
        yield "message_start", {"type": "message_start", "message": start}
        yield "ping", {"type": "ping"}
        for index, block in enumerate(self.body["content"]):
            yield from _block_events(index, block)
        if fail is not None:
            yield "error", {"type": "error", "error": {"type": fail.type, "message": fail.message}}
            return
        usage = {k: v for k, v in self.body["usage"].items() if k != "service_tier"}
        delta = {"stop_reason": self.body["stop_reason"], "stop_sequence": None}
        yield "message_delta", {"type": "message_delta", "delta": delta, "usage": usage}
        yield "message_stop", {"type": "message_stop"}


def _chunks(text: str, size: int = 24) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _block_events(index: int, block: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """content_block_start / delta… / stop for one block, with deltas the way the API splits them."""
    kind = block["type"]
    if kind == "text":
        start = {**block, "text": ""}
        if "citations" in start:
            start["citations"] = []  # they follow as citations_delta events, as the API streams them
        yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": start}
        for citation in block.get("citations") or []:
            delta = {"type": "citations_delta", "citation": citation}
            yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        for piece in _chunks(block["text"]):
            delta = {"type": "text_delta", "text": piece}
            yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    elif kind in ("tool_use", "server_tool_use"):
        yield (
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}},
        )
        for piece in _chunks(json.dumps(block["input"])):
            delta = {"type": "input_json_delta", "partial_json": piece}
            yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    else:
        yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
    yield "content_block_stop", {"type": "content_block_stop", "index": index}


class _Ids:
    """Deterministic, per-server ids (msg_fake_0001, …) so failures are easy to read."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def next(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}_fake_{next(self._counter):04d}"


def _build_message(reply: Reply, request: RecordedRequest, ids: _Ids) -> _Message:
    """The assistant message for a content-producing reply (Text, ToolUse, WebSearch, StreamError)."""
    content: list[dict[str, Any]] = []
    usage: Usage | None = None
    stop_reason = "end_turn"
    if isinstance(reply, Text):
        text = default_text(request) if reply.text is None else reply.text
        content, usage, stop_reason = _text_blocks(text, {}), reply.usage, reply.stop_reason
    elif isinstance(reply, ToolUse):
        if reply.text:
            content.append({"type": "text", "text": reply.text})
        tool_id = reply.id or ids.next("toolu")
        content.append({"type": "tool_use", "id": tool_id, "name": reply.name, "input": reply.input})
        usage, stop_reason = reply.usage, "tool_use"
    elif isinstance(reply, WebSearch):
        tool_id = ids.next("srvtoolu")
        results = [
            {
                "type": "web_search_result",
                "title": title,
                "url": url,
                "encrypted_content": "ZmFrZQ==",
                "page_age": None,
            }
            for title, url in reply.results
        ]
        content = [
            {"type": "server_tool_use", "id": tool_id, "name": "web_search", "input": {"query": reply.query}},
            {"type": "web_search_tool_result", "tool_use_id": tool_id, "content": results},
        ]
        if reply.text:
            content.extend(_text_blocks(reply.text, {url: title for title, url in reply.results}))
        usage, stop_reason = reply.usage, reply.stop_reason
    elif isinstance(reply, StreamError):
        content = [{"type": "text", "text": reply.text}]
    body = {
        "id": ids.next("msg"),
        "type": "message",
        "role": "assistant",
        "model": request.model or "claude-fake",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _usage_json(usage, request, content),
    }
    return _Message(body)


def _text_blocks(text: TextParts, titles: dict[str, str]) -> list[dict[str, Any]]:
    """Text blocks for `text`: a `Cite` span becomes a block with web_search_result_location citations
    (titles looked up in this reply's search results), plain strings plain blocks."""
    if isinstance(text, str):
        return [{"type": "text", "text": text}]
    blocks: list[dict[str, Any]] = []
    for part in text:
        if isinstance(part, Cite):
            citations = [
                {
                    "type": "web_search_result_location",
                    "url": url,
                    "title": (part.title if url == part.url else None) or titles.get(url) or url,
                    "cited_text": part.cited_text if part.cited_text is not None else part.text,
                    "encrypted_index": "ZmFrZQ==",
                }
                for url in (part.url, *part.also)
            ]
            blocks.append({"type": "text", "text": part.text, "citations": citations})
        else:
            blocks.append({"type": "text", "text": str(part)})
    return blocks


def default_text(request: RecordedRequest) -> str:
    """The deterministic default answer: it says what it was asked, so by-hand runs are legible."""
    prompt = strip_directives(request.prompt_text or request.last_user_text)
    return f"fake reply: {prompt[:200]}"


# --------------------------------------------------------------------------------------------------
# Batches


@dataclass
class _Batch:
    """A Message Batch: results are decided at creation (rules apply), revealed after `batch_delay`.

    Cancelling an unfinished batch answers `canceling` once, then the batch is `ended` with every
    request `canceled` (the real API may finish some; a fake need not).
    """

    id: str
    created: datetime
    ends: datetime
    results: list[dict[str, Any]]
    cancelled_at: datetime | None = None

    def ended(self) -> bool:
        return self.cancelled_at is not None or datetime.now(UTC) >= self.ends

    def to_json(self, base_url: str, canceling: bool = False) -> dict[str, Any]:
        ended = self.ended() and not canceling
        status = "canceling" if canceling else "ended" if ended else "in_progress"
        counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        for line in self.result_lines():
            counts[line["result"]["type"] if ended else "processing"] += 1
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "created_at": _iso(self.created),
            "expires_at": _iso(self.created + timedelta(hours=24)),
            "ended_at": _iso(self.cancelled_at or self.ends) if ended else None,
            "cancel_initiated_at": _iso(self.cancelled_at) if self.cancelled_at else None,
            "archived_at": None,
            "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if ended else None,
        }

    def result_lines(self) -> list[dict[str, Any]]:
        if self.cancelled_at is None:
            return self.results
        return [{"custom_id": r["custom_id"], "result": {"type": "canceled"}} for r in self.results]


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------------
# The server


class _ClientGone(Exception):
    """The client closed the connection while the fake was waiting."""


class _Stopping(Exception):
    """The fake is shutting down: slow replies give up instead of holding up `stop()`."""


class FakeAnthropic:
    """The fake API server. Use as `with FakeAnthropic() as fake:` (or `async with`), or start()/stop().

    Thread-safe: the server runs in its own thread and event loop; tests add rules and read
    `requests` from theirs.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str = DEFAULT_API_KEY,
        batch_delay: float = 0.0,
        default: Callable[[RecordedRequest], Reply] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.batch_delay = batch_delay
        """Seconds a batch stays `in_progress` before it reports `ended` with results."""
        self.default = default
        """Answers requests no rule or directive matched; None means `Text("fake reply: …")`."""
        self.requests: list[RecordedRequest] = []
        self.rules: list[Rule] = []
        # Reentrant: a callable reply runs under the lock and may read `fake.message_requests`.
        self._lock = threading.RLock()
        self._directive_uses: dict[str, int] = {}
        self._batches: dict[str, _Batch] = {}
        self._ids = _Ids()
        self._stopping = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeAnthropic:
        """Bind (port 0 picks a free one), serve in a daemon thread, return once it accepts connections."""
        self._stopping.clear()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app(),
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-anthropic", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake Anthropic server did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stop serving; requests still open get about a second, then are cut off."""
        if self._server is not None and self._thread is not None:
            self._stopping.set()
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeAnthropic:
        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await anyio.to_thread.run_sync(self.stop)

    def env(self) -> dict[str, str]:
        """Environment that points the anthropic SDK or the Claude Code CLI here, and nowhere else."""
        return {
            "ANTHROPIC_BASE_URL": self.base_url,
            "ANTHROPIC_API_KEY": self.api_key,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "DISABLE_AUTOUPDATER": "1",
        }

    # -- scripting ---------------------------------------------------------------------------------

    def on(
        self,
        contains: str | None = None,
        replies: ReplyLike | Sequence[ReplyLike] = (),
        *,
        in_conversation: str | None = None,
        system: str | None = None,
        model: str | None = None,
        match: Callable[[RecordedRequest], bool] | None = None,
        times: int | None = None,
    ) -> Rule:
        """Script replies for matching /v1/messages requests (see `Rule`); returns the rule to inspect.

        `fake.on("kittens", [Error(529), Text("meow")])`: the first request whose prompt mentions
        kittens gets a 529, every later one "meow". Add `times=2` to let the rule go after two.
        """
        sequence: list[ReplyLike] = (
            [replies] if isinstance(replies, Reply) or callable(replies) else list(replies)
        )
        if not sequence:
            raise ValueError("a rule needs at least one reply")
        rule = Rule(sequence, contains, in_conversation, system, model, match, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def reset(self) -> None:
        """Forget rules, recorded requests, directive counts and batches (keeps serving)."""
        with self._lock:
            self.rules.clear()
            self.requests.clear()
            self._directive_uses.clear()
            self._batches.clear()

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    @property
    def message_requests(self) -> list[RecordedRequest]:
        """Only the POST /v1/messages calls, oldest first."""
        with self._lock:
            return [r for r in self.requests if r.is_message]

    @property
    def unhandled(self) -> list[RecordedRequest]:
        """Requests answered 404 because the fake does not implement the path: what else a client wants."""
        with self._lock:
            return [r for r in self.requests if r.status == 404 and not r.is_message]

    async def wait_for_request(
        self, predicate: Callable[[RecordedRequest], bool] | None = None, timeout: float = 10.0
    ) -> RecordedRequest:
        """The first messages request matching `predicate`, waiting for it to arrive (async tests).

        Lets a test act at the moment the server has a request in hand, e.g. cancel a slow one.
        """
        with anyio.fail_after(timeout):
            while True:
                for request in self.message_requests:
                    if predicate is None or predicate(request):
                        return request
                await anyio.sleep(0.01)

    def choose(self, request: RecordedRequest) -> Reply:
        """The reply for a messages request: first live rule, then prompt directives, then the default."""
        with self._lock:
            for rule in self.rules:
                if not rule.expired and rule.matches(request):
                    return rule.take(request)
            try:
                directives = parse_directives(request.prompt_text)
            except ValueError as e:  # say what is wrong in the prompt instead of a bare 500
                return Error(400, f"fake: {e}")
            for directive in directives:
                used = self._directive_uses.get(directive.source, 0)
                if directive.times is None or used < directive.times:
                    self._directive_uses[directive.source] = used + 1
                    return directive.reply
        if self.default is not None:
            return self.default(request)
        return Text()

    # -- HTTP --------------------------------------------------------------------------------------

    def app(self) -> Starlette:
        """The ASGI app (usable on its own, e.g. mounted in another server)."""
        return Starlette(
            routes=[
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self._count_tokens, methods=["POST"]),
                Route("/v1/messages/batches", self._create_batch, methods=["POST"]),
                Route("/v1/messages/batches", self._list_batches, methods=["GET"]),
                Route("/v1/messages/batches/{batch_id}", self._get_batch, methods=["GET"]),
                Route("/v1/messages/batches/{batch_id}/cancel", self._cancel_batch, methods=["POST"]),
                Route("/v1/messages/batches/{batch_id}/results", self._batch_results, methods=["GET"]),
                Route("/api/hello", self._hello, methods=["GET", "HEAD"]),
                Route(
                    "/{path:path}", self._not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
                ),
            ],
            middleware=[],
        )

    async def _record(self, request: Request) -> RecordedRequest:
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        recorded = RecordedRequest(
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            time=time.time(),
            request_id=f"req_fake_{uuid.uuid4().hex[:20]}",
        )
        with self._lock:
            self.requests.append(recorded)
        return recorded

    def _authorized(self, recorded: RecordedRequest) -> bool:
        """Any non-empty key counts: the SDK sends `Authorization: Bearer`, the CLI `x-api-key`."""
        bearer = recorded.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return bool(recorded.headers.get("x-api-key", "").strip() or bearer)

    def _json(self, recorded: RecordedRequest, body: Any, status: int = 200, **headers: str) -> Response:
        recorded.status = status
        return JSONResponse(body, status_code=status, headers={"request-id": recorded.request_id, **headers})

    def _error(
        self, recorded: RecordedRequest, status: int, message: str, error_type: str | None = None
    ) -> Response:
        return self._error_reply(recorded, Error(status, message=message, type=error_type))

    def _error_reply(self, recorded: RecordedRequest, reply: Error) -> Response:
        headers = {
            "x-should-retry": "true" if reply.status in (408, 409, 429) or reply.status >= 500 else "false"
        }
        if reply.retry_after is not None:
            headers["retry-after"] = f"{reply.retry_after:g}"
        body = {
            "type": "error",
            "error": {"type": reply.error_type, "message": reply.error_message},
            "request_id": recorded.request_id,
        }
        return self._json(recorded, body, reply.status, **headers)

    async def _guarded(self, request: Request) -> tuple[RecordedRequest, Response | None]:
        """Record the request; answer 401 right away when it carries no key."""
        recorded = await self._record(request)
        if not self._authorized(recorded):
            message = "x-api-key header is required"
            return recorded, self._error(recorded, 401, message, "authentication_error")
        return recorded, None

    async def _pause(self, request: Request, recorded: RecordedRequest, seconds: float) -> None:
        """Sleep, but notice a client that hangs up (so slow replies end when a caller cancels)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stopping.is_set():
                raise _Stopping
            if await request.is_disconnected():
                recorded.disconnected = True
                raise _ClientGone
            await anyio.sleep(min(left, 0.05))

    async def _messages(self, request: Request) -> Response:
        recorded, denied = await self._guarded(request)
        if denied is not None:
            return denied
        problem = _validate(recorded.body)
        if problem:
            return self._error(recorded, 400, problem)
        recorded.reply = self.choose(recorded)
        return await self._respond(request, recorded, recorded.reply)

    async def _respond(self, request: Request, recorded: RecordedRequest, reply: Reply) -> Response:
        try:
            await self._pause(request, recorded, reply.delay)
        except _ClientGone:
            recorded.status = 499  # nginx's "client closed request": nobody will read it
            return Response(status_code=499)
        except _Stopping:
            return self._error(recorded, 503, "fake Anthropic server is shutting down", "api_error")
        if isinstance(reply, Error):
            return self._error_reply(recorded, reply)
        if isinstance(reply, WebSearch) and not recorded.has_web_search:
            return self._error(
                recorded, 400, "fake: a WebSearch reply needs a web_search tool in the request"
            )
        fail = reply if isinstance(reply, StreamError) else None
        if not recorded.stream:
            if fail is not None:
                status = _STATUS_FOR_TYPE.get(fail.type, 500)
                return self._error(recorded, status, fail.message, fail.type)
            return self._json(recorded, _build_message(reply, recorded, self._ids).body)
        message = _build_message(reply, recorded, self._ids)
        recorded.status = 200
        return StreamingResponse(
            self._sse(request, recorded, message, fail, reply.event_delay),
            media_type="text/event-stream",
            headers={"request-id": recorded.request_id, "cache-control": "no-cache"},
        )

    async def _sse(
        self,
        request: Request,
        recorded: RecordedRequest,
        message: _Message,
        fail: StreamError | None,
        event_delay: float,
    ) -> AsyncIterator[bytes]:
        """Every event gets an `event:` line: the SDKs skip data-only events."""
        try:
            for number, (name, data) in enumerate(message.sse_events(fail)):
                if number and event_delay:
                    await self._pause(request, recorded, event_delay)
                yield f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
        except (_ClientGone, _Stopping):
            return
        except anyio.get_cancelled_exc_class():
            recorded.disconnected = True
            raise

    async def _count_tokens(self, request: Request) -> Response:
        recorded, denied = await self._guarded(request)
        if denied is not None:
            return denied
        if not isinstance(recorded.body, dict) or "messages" not in recorded.body:
            return self._error(recorded, 400, "messages: Field required")
        return self._json(recorded, {"input_tokens": _input_tokens(recorded)})

    async def _create_batch(self, request: Request) -> Response:
        recorded, denied = await self._guarded(request)
        if denied is not None:
            return denied
        items = recorded.body.get("requests") if isinstance(recorded.body, dict) else None
        if not isinstance(items, list) or not items:
            return self._error(recorded, 400, "requests: at least one request is required")
        results = []
        for item in items:
            params = item.get("params") if isinstance(item, dict) else None
            problem = _validate(params) if "custom_id" in item else "custom_id: Field required"
            if problem:
                return self._error(recorded, 400, f"requests.{len(results)}.{problem}")
            results.append({"custom_id": item["custom_id"], "result": self._batch_result(recorded, params)})
        batch_id = self._ids.next("msgbatch")
        now = datetime.now(UTC)
        batch = _Batch(batch_id, now, now + timedelta(seconds=self.batch_delay), results)
        with self._lock:
            self._batches[batch_id] = batch
        return self._json(recorded, batch.to_json(self.base_url))

    def _batch_result(self, recorded: RecordedRequest, params: dict[str, Any]) -> dict[str, Any]:
        """Rules and directives answer each batched request as if it had been sent on its own."""
        one = RecordedRequest(
            "POST", "/v1/messages", "", recorded.headers, params, time.time(), recorded.request_id
        )
        reply = self.choose(one)
        if isinstance(reply, WebSearch) and not one.has_web_search:
            reply = Error(400, "fake: a WebSearch reply needs a web_search tool in the request")
        if isinstance(reply, StreamError):
            reply = Error(_STATUS_FOR_TYPE.get(reply.type, 500), reply.message, type=reply.type)
        if isinstance(reply, Error):
            error = {"type": reply.error_type, "message": reply.error_message}
            return {"type": "errored", "error": {"type": "error", "error": error, "request_id": None}}
        return {"type": "succeeded", "message": _build_message(reply, one, self._ids).body}

    def _find_batch(self, recorded: RecordedRequest, batch_id: str) -> _Batch | Response:
        with self._lock:
            batch = self._batches.get(batch_id)
        return batch or self._error(recorded, 404, f"batch {batch_id} not found", "not_found_error")

    async def _get_batch(self, request: Request) -> Response:
        recorded, denied = await self._guarded(request)
        if denied is not None:
            return denied
        batch = self._find_batch(recorded, request.path_params["batch_id"])
        return batch if isinstance(batch, Response) else self._json(recorded, batch.to_json(self.base_url))

    async def _list_batches(self, request: Request) -> Response:
        recorded, denied = await self._guarded(request)
        if denied is not None:
            return denied
        with self._lock:
            data = [b.to_json(self.base_url) for b in reversed(self._batches.values())]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return self._json(recorded, {"data": data, "has_more": False, "first_id": first, "last_id": last})

    async def _cancel_batch(self, request: Request) -> Response:
        recorded, denied = await self._guarded(request)
        if denied is not None:
            return denied
        batch = self._find_batch(recorded, request.path_params["batch_id"])
        if isinstance(batch, Response):
            return batch
        if batch.ended():
            return self._json(recorded, batch.to_json(self.base_url))
        batch.cancelled_at = datetime.now(UTC)
        return self._json(recorded, batch.to_json(self.base_url, canceling=True))

    async def _batch_results(self, request: Request) -> Response:
        recorded, denied = await self._guarded(request)
        if denied is not None:
            return denied
        batch = self._find_batch(recorded, request.path_params["batch_id"])
        if isinstance(batch, Response):
            return batch
        if not batch.ended():
            return self._error(recorded, 400, f"batch {batch.id} is still in progress")
        recorded.status = 200
        lines = "".join(json.dumps(line) + "\n" for line in batch.result_lines())
        return Response(lines, media_type="application/binary", headers={"request-id": recorded.request_id})

    async def _hello(self, request: Request) -> Response:
        """The Claude Code CLI's connectivity probe (sent unless nonessential traffic is disabled)."""
        recorded = await self._record(request)
        return self._json(recorded, {"message": "hello"})

    async def _not_found(self, request: Request) -> Response:
        recorded = await self._record(request)
        return self._error(recorded, 404, f"fake Anthropic API has no {request.method} {request.url.path}")


def _validate(body: Any) -> str | None:
    """The few checks the real API would fail a request on, so a malformed request shows up in tests."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    for key in ("model", "max_tokens", "messages"):
        if key not in body:
            return f"{key}: Field required"
    if not isinstance(body["messages"], list) or not body["messages"]:
        return "messages: at least one message is required"
    if not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1:
        return "max_tokens: must be a positive integer"
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """Serve in the foreground: try sidequest (or `claude -p`) by hand without an API key."""
    parser = argparse.ArgumentParser(
        prog="python -m sidequest.testing.fake_anthropic", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (the default)")
    parser.add_argument("--batch-delay", type=float, default=0.0, help="seconds a batch stays in progress")
    args = parser.parse_args(argv)
    fake = FakeAnthropic(host=args.host, port=args.port, batch_delay=args.batch_delay)
    with fake:
        print(f"fake Anthropic API at {fake.base_url}\n\nexport these to use it:")
        for key, value in fake.env().items():
            print(f"  export {key}={value}")
        print('\nprompt directives: [[fake:text="hi"]] [[fake:error=429 retry_after=2 times=1]]')
        print('  [[fake:delay=5]] [[fake:tool=Write {"file_path":"/tmp/x","content":"y"}]]')
        print("(Ctrl-C stops)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
