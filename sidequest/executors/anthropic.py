"""The `anthropic` executor: an agent file run as a Messages API conversation.

The agent's body is the system prompt, its model an alias or id. Turns are
streamed (a non-streaming call refuses large `max_tokens`). Server-side tools
(web search, web fetch) run on Anthropic's side, so a research agent needs no
local tools; when the server pauses a long turn (`pause_turn`) we send the
conversation back to let it continue, up to the agent's `maxTurns`. The
answer keeps the web pages it cites: `[n]` after each cited span and a numbered
"Sources:" list at the end of the text (see `Sources`).

Retries belong to the engine, not the SDK: the SDK would obey a `retry-after`
of an hour with no cap and hide every attempt from the task's history. So the
SDK retries at most once, and overload, rate-limit, 5xx and connection errors
become RetryableError carrying the server's (capped) `retry-after`; 4xx errors
fail the task at once with the API's own message.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import time
from typing import Any

import anthropic
import anyio
from anthropic import AsyncAnthropic

from sidequest.agent_definition import AgentDefinition
from sidequest.config import Settings
from sidequest.executors.base import (
    ExecutionResult,
    PermanentError,
    ReportedUsage,
    RetryableError,
    TaskContext,
)
from sidequest.models import TaskOptions, utcnow

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}
CLAUDE_CODE_SERVER_TOOLS = {"WebSearch": "web_search", "WebFetch": "web_fetch"}
"""Claude Code tool names an agent file may list that the API can run server-side."""
_RETRYABLE_STREAM_ERRORS = {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}


def api_key(settings: Settings) -> str | None:
    """Read at each attempt, not at start: a key exported after the server started still counts."""
    return os.environ.get(settings.anthropic.api_key_env) or None


def missing_key_warning(settings: Settings, agent: str) -> str | None:
    """For `task_async`: the task is accepted (the key may be set before it runs), but say so now."""
    if api_key(settings) is not None:
        return None
    return (
        f"{settings.anthropic.api_key_env} is not set in the sidequest server's environment, "
        f"so this {agent!r} task will fail; set it and restart the server"
    )


def require_api_key(settings: Settings) -> str:
    key = api_key(settings)
    if key is None:
        raise PermanentError(
            f"no Anthropic API key: set {settings.anthropic.api_key_env} in the environment of the "
            "sidequest server (or anthropic.api_key_env in the config to read another variable)"
        )
    return key


class ClientPool:
    """One AsyncAnthropic per (key, base URL), shared by every agent, closed with the engine."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._clients: dict[tuple[str, str | None], AsyncAnthropic] = {}

    def get(self, api_key: str) -> AsyncAnthropic:
        cfg = self.settings.anthropic
        key = (api_key, cfg.base_url)
        client = self._clients.get(key)
        if client is None:
            client = AsyncAnthropic(
                api_key=api_key,
                base_url=cfg.base_url,
                max_retries=cfg.sdk_max_retries,
                timeout=cfg.request_timeout,
            )
            self._clients[key] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()


class AnthropicExecutor:
    name = "anthropic"

    def __init__(self, definition: AgentDefinition, settings: Settings, clients: ClientPool) -> None:
        self.definition = definition
        self.settings = settings
        self.clients = clients
        cfg = settings.anthropic
        self.model = settings.model_id(definition.model)
        self.max_turns = definition.max_turns or cfg.max_turns
        self.max_tokens = definition.keys.max_tokens or cfg.max_tokens
        self.warnings: list[str] = []
        self.tools = self._server_tools()

    def _server_tools(self) -> list[dict[str, Any]]:
        wanted = list(self.definition.keys.server_tools)
        unusable = []
        for tool in self.definition.tools or []:
            if tool in CLAUDE_CODE_SERVER_TOOLS:
                wanted.append(CLAUDE_CODE_SERVER_TOOLS[tool])  # type: ignore[arg-type]
            else:
                unusable.append(tool)
        if unusable:
            self.warnings.append(
                f"tools {', '.join(unusable)} need Claude Code; the anthropic executor runs only server "
                "tools (WebSearch, WebFetch). Set `executor: claude-code` to use them."
            )
        cfg = self.settings.anthropic
        tools: list[dict[str, Any]] = []
        for kind in dict.fromkeys(wanted):
            if kind == "web_search":
                tool: dict[str, Any] = {"type": cfg.web_search_tool, "name": "web_search"}
                if self.definition.keys.web_search_max_uses:
                    tool["max_uses"] = self.definition.keys.web_search_max_uses
            else:
                tool = {"type": cfg.web_fetch_tool, "name": "web_fetch"}
            tools.append(tool)
        return tools

    def preflight(self, options: TaskOptions, scope: str, workdir_roots: list[str]) -> list[str]:
        warning = missing_key_warning(self.settings, self.definition.name)
        return [warning] if warning else []

    async def run(self, prompt: str, ctx: TaskContext) -> ExecutionResult:
        client = self.clients.get(require_api_key(self.settings))
        batch = ctx.options.get("batch")
        if batch is None:
            batch = self.definition.keys.batch
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
        texts: list[str] = []
        sources = Sources()
        for turn in range(1, self.max_turns + 1):
            params = self._params(messages)
            if batch:
                message = await self._batch_turn(client, params, ctx, turn)
            else:
                message = await self._stream_turn(client, params)
            _log_turn(ctx, turn, message.content)
            self._record_usage(message, ctx, batch=bool(batch))
            texts.extend(sources.read(message.content))
            reason = message.stop_reason
            ctx.report_progress(None, f"turn {turn}/{self.max_turns} done ({reason})")
            if reason == "pause_turn":
                messages = [*messages, {"role": "assistant", "content": _dump_blocks(message.content)}]
                continue
            if reason == "tool_use":
                names = ", ".join(b.name for b in message.content if b.type == "tool_use")
                raise PermanentError(
                    f"the model asked for tools the anthropic executor does not run ({names}); "
                    "give the agent `executor: claude-code` to use local tools"
                )
            if reason == "refusal":
                raise PermanentError("the model declined the request (stop_reason 'refusal')")
            if reason == "max_tokens":
                ctx.report_progress(None, f"output stopped at max_tokens={self.max_tokens}")
                texts.append(f"\n[output cut at max_tokens={self.max_tokens}]")
            return ExecutionResult(sources.render("".join(texts).strip()), sources=sources.listed())
        raise PermanentError(
            f"the agent used all {self.max_turns} turns (maxTurns) without finishing; "
            "raise maxTurns in the agent file or narrow the prompt"
        )

    def _params(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "messages": messages}
        if self.definition.system_prompt:
            params["system"] = self.definition.system_prompt
        if self.tools:
            params["tools"] = self.tools
        return params

    async def _stream_turn(self, client: AsyncAnthropic, params: dict[str, Any]) -> Any:
        try:
            async with client.messages.stream(**params) as stream:
                return await stream.get_final_message()
        except anthropic.APIError as exc:
            raise self._translate(exc) from exc

    async def _batch_turn(
        self, client: AsyncAnthropic, params: dict[str, Any], ctx: TaskContext, turn: int
    ) -> Any:
        """Half price, answered within hours: the task stays `running` while we poll."""
        custom_id = f"{ctx.task_id}-{turn}"[-64:]
        try:
            batch_id = ctx.batch_id if turn == 1 else None  # an earlier attempt already paid for it
            if batch_id is not None:
                existing = await client.messages.batches.retrieve(batch_id)
                if existing.processing_status == "canceling" or (
                    existing.processing_status == "ended" and not existing.request_counts.succeeded
                ):
                    batch_id = None
            if batch_id is None:
                created = await client.messages.batches.create(
                    requests=[{"custom_id": custom_id, "params": params}]  # type: ignore[list-item]
                )
                batch_id = created.id
                ctx.save_state(batch_id=batch_id)
            try:
                started = time.monotonic()
                while True:
                    current = await client.messages.batches.retrieve(batch_id)
                    if current.processing_status == "ended":
                        break
                    waited = int(time.monotonic() - started)
                    ctx.report_progress(None, f"waiting for message batch {batch_id} ({waited}s so far)")
                    await anyio.sleep(self.settings.anthropic.batch_poll_interval)
            except anyio.get_cancelled_exc_class():
                with anyio.move_on_after(5, shield=True):
                    await client.messages.batches.cancel(batch_id)
                raise
            async for entry in await client.messages.batches.results(batch_id):
                result = entry.result
                if result.type == "succeeded":
                    return result.message
                if result.type == "errored":
                    error = result.error.error
                    message = f"Anthropic batch request failed: {error.type}: {error.message}"
                    if error.type in ("invalid_request_error", "authentication_error", "permission_error"):
                        raise PermanentError(message)
                    raise RetryableError(message)
                raise RetryableError(f"Anthropic batch {batch_id} request was {result.type}")
            raise RetryableError(f"Anthropic batch {batch_id} ended without a result for this task")
        except anthropic.APIError as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: anthropic.APIError) -> Exception:
        if isinstance(exc, anthropic.APIConnectionError):  # includes APITimeoutError
            return RetryableError(f"cannot reach the Anthropic API: {type(exc).__name__}: {exc}")
        if not isinstance(exc, anthropic.APIStatusError):
            return RetryableError(f"Anthropic API error: {exc}")
        kind, text = _error_body(exc)
        request_id = exc.request_id or exc.response.headers.get("request-id")
        where = f" (request id {request_id})" if request_id else ""
        status = exc.status_code
        if status == 200:  # an error event in the middle of a stream
            message = f"Anthropic API stream error {kind}: {text}{where}"
            if kind in _RETRYABLE_STREAM_ERRORS:
                return RetryableError(message)
            return PermanentError(message)
        message = f"Anthropic API {status} {kind}: {text}{where}"
        if status in RETRYABLE_STATUS:
            return RetryableError(message, retry_after=self._retry_after(exc.response.headers))
        if status == 401:
            message += f" — check {self.settings.anthropic.api_key_env}"
        return PermanentError(message)

    def _retry_after(self, headers: Any) -> float | None:
        """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date), capped by config."""
        seconds: float | None = None
        raw_ms = headers.get("retry-after-ms")
        raw = headers.get("retry-after")
        try:
            if raw_ms is not None:
                seconds = float(raw_ms) / 1000
            elif raw is not None:
                seconds = float(raw)
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(raw) if raw else None
            if parsed is not None:
                seconds = (parsed - utcnow()).total_seconds()
        if seconds is None:
            return None
        return max(0.0, min(seconds, self.settings.anthropic.max_retry_after))

    def _record_usage(self, message: Any, ctx: TaskContext, batch: bool) -> None:
        usage = message.usage
        cache_write = usage.cache_creation_input_tokens or 0
        cache_read = usage.cache_read_input_tokens or 0
        server = getattr(usage, "server_tool_use", None)
        searches = (getattr(server, "web_search_requests", 0) or 0) if server is not None else 0
        price = self.settings.price(message.model)
        cost = None
        if price is not None:
            cost = price.cost(usage.input_tokens, usage.output_tokens, cache_write, cache_read, searches)
            if batch:
                cost /= 2
        ctx.record_usage(
            ReportedUsage(
                message.model,
                usage.input_tokens,
                usage.output_tokens,
                cache_write,
                cache_read,
                cost,
            )
        )


class Sources:
    """The web pages an answer cites, so a research result keeps its URLs.

    The API answers after a web search with text blocks that carry `web_search_result_location`
    citations (url, title, cited_text). Each cited page gets a number in the order of its first
    citation, once per URL across the whole run (pause_turn continuations included); the cited
    span is followed by its `[n]` markers and the result ends with a numbered "Sources:" list.
    Search results the answer does not cite are left out, and a result with no citations is
    returned unchanged. Citations without a URL (documents) are ignored.
    """

    def __init__(self) -> None:
        self._numbers: dict[str, int] = {}
        self._titles: dict[str, str] = {}
        """Titles from web_search_tool_result blocks, for citations that come without one."""

    def read(self, blocks: list[Any]) -> list[str]:
        """The text of one assistant turn's blocks, each cited span followed by its markers."""
        texts = []
        for block in blocks:
            if block.type == "web_search_tool_result" and isinstance(block.content, list):
                for result in block.content:
                    title = " ".join((getattr(result, "title", None) or "").split())
                    if getattr(result, "url", None) and title:
                        self._titles.setdefault(result.url, title)
            if block.type != "text":
                continue
            numbers: list[int] = []
            for citation in block.citations or []:
                url = getattr(citation, "url", None)
                if not url:
                    continue
                if url not in self._numbers:
                    self._numbers[url] = len(self._numbers) + 1
                title = " ".join((getattr(citation, "title", None) or "").split())
                if title:
                    self._titles.setdefault(url, title)
                if self._numbers[url] not in numbers:
                    numbers.append(self._numbers[url])
            text = block.text
            if numbers:
                body = text.rstrip()
                text = body + "".join(f"[{n}]" for n in numbers) + text[len(body) :]
            texts.append(text)
        return texts

    def listed(self) -> list[dict[str, Any]]:
        return [{"n": n, "title": self._titles.get(url), "url": url} for url, n in self._numbers.items()]

    def render(self, text: str) -> str:
        """`text` followed by the numbered list of sources, or unchanged when nothing was cited."""
        if not self._numbers:
            return text
        lines = []
        for source in self.listed():
            title = source["title"]
            label = f"{title} — {source['url']}" if title and title != source["url"] else source["url"]
            lines.append(f"[{source['n']}] {label}")
        return f"{text}\n\nSources:\n" + "\n".join(lines)


def _log_turn(ctx: TaskContext, turn: int, blocks: list[Any]) -> None:
    """The task's run log gets what the turn said and did: text, tool calls with their input, and
    the pages a web search found (URLs, so a reader can check what the answer rests on)."""
    for block in blocks:
        kind = block.type
        if kind == "text":
            ctx.log("text", block.text, {"turn": turn})
        elif kind in ("tool_use", "server_tool_use"):
            data = {"turn": turn, "tool": block.name, "id": block.id, "input": block.input}
            ctx.log("tool_use", f"{block.name} {_brief(block.input)}", data)
        elif kind == "web_search_tool_result":
            content = block.content
            if isinstance(content, list):
                found = [
                    {"title": getattr(r, "title", None), "url": getattr(r, "url", None)} for r in content
                ]
                urls = [r["url"] for r in found if r["url"]]
                message = f"web search: {len(urls)} result(s)" + (f": {', '.join(urls[:5])}" if urls else "")
                ctx.log(
                    "web_search", message, {"turn": turn, "tool_use_id": block.tool_use_id, "results": found}
                )
            else:  # an error object: the search did not run
                code = getattr(content, "error_code", "error")
                ctx.log("web_search", f"web search failed: {code}", {"turn": turn, "error": str(code)})
        elif kind.endswith("_tool_result"):
            dumped = block.model_dump(mode="json", exclude_none=True)
            ctx.log(
                "tool_result", f"{kind} for {getattr(block, 'tool_use_id', '?')}", {"turn": turn, **dumped}
            )


def _brief(value: Any, limit: int = 200) -> str:
    """A tool input on one line, short: the entry's data holds it whole."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _dump_blocks(blocks: list[Any]) -> list[dict[str, Any]]:
    return [block.model_dump(mode="json", exclude_none=True) for block in blocks]


def _error_body(exc: anthropic.APIStatusError) -> tuple[str, str]:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("type", "error")), str(error.get("message", exc.message))
    return "error", str(exc.message)
