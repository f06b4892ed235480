"""The child side of an isolated python agent: `python -m sidequest.executors.python_child`.

The parent (`python_process.py`) starts one of these per attempt, writes one
`start` frame to its stdin, and reads frames from its stdout until a `result`
or `error` frame or the end of the stream. Everything the callable does with
its context (progress, usage, saved state) becomes a frame the parent applies
to the real TaskContext.

Frames are a 4-byte big-endian length and that many bytes of JSON (UTF-8;
lone surrogates pass through, so text the callable produced arrives as it
was). A result may be megabytes; a length prefix carries it in one frame.

The protocol gets private copies of fds 0 and 1 before any agent code is
imported: stdin then reads /dev/null and stdout writes to stderr, so neither
`print` nor `input` nor a C library writing to fd 1 can corrupt a frame. The
parent keeps the end of stderr for its error messages.

How the child stops:
- SIGTERM (the parent's cancel or timeout) raises in the main thread, so
  `finally` blocks and context managers run; the parent sends SIGKILL to the
  process group if that takes longer than a short grace.
- The parent going away (stdin reaches its end) is treated like SIGTERM, so
  a killed daemon leaves no agent running.
- After the result is sent the child ends with `os._exit`: threads the
  callable left behind must not keep an attempt that is over alive.

This module imports only the standard library at start: each attempt pays for
a fresh interpreter, and agent code that needs sidequest imports it itself.
It is shared with the parent for the frame format and for the rules that turn
a callable's return value into a result (`encode_result`).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import signal
import struct
import sys
import threading
import time

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs every attempt a few ms
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30
"""Largest frame either side accepts (1 GiB): a bigger length means a corrupted stream."""
ORPHAN_GRACE = 2.0
"""Seconds a child whose parent vanished gives the callable to stop before it exits anyway."""
EXIT_STOPPED = 128 + signal.SIGTERM


# ---- frames (both sides) ---------------------------------------------------


def encode_frame(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, ensure_ascii=False, default=str).encode("utf-8", errors="surrogatepass")
    if len(data) > MAX_FRAME:
        raise ValueError(f"message of {len(data)} bytes is larger than the {MAX_FRAME}-byte frame limit")
    return HEADER.pack(len(data)) + data


class FrameDecoder:
    """Collects bytes as they arrive and yields each complete frame's message."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME:
                raise ValueError(f"frame length {size} is over the limit: the stream is corrupted")
            end = HEADER.size + size
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            message = json.loads(payload.decode("utf-8", errors="surrogatepass"))
            if not isinstance(message, dict):
                raise ValueError("a frame is not a JSON object")
            yield message

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame (non-zero at end of stream means it was cut off)."""
        return len(self._buffer)


# ---- rules shared with the inline executor --------------------------------


class LoadError(Exception):
    """The callable cannot be imported or found: retrying will not fix the configuration."""


def load_callable(spec: str) -> Callable[..., Any]:
    """Import `package.module:function` (the attribute may be dotted: `module:Class.method`)."""
    module_name, _, attr_path = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise LoadError(f"cannot import module {module_name!r} for callable {spec!r}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise LoadError(f"{module_name!r} has no attribute {attr_path!r} (callable {spec!r})") from exc
    if not callable(target):
        raise LoadError(f"{spec!r} is not callable")
    return target


def encode_result(value: Any) -> tuple[str, str]:
    """(content, content_type): text stays text, None is "", anything else must be JSON-able.

    An ExecutionResult passes through. Raises TypeError for a value that is
    neither text nor JSON-able (pydantic models are dumped).
    """
    base = sys.modules.get("sidequest.executors.base")  # agent code that returns one has imported it
    if base is not None and isinstance(value, base.ExecutionResult):
        return value.content, value.content_type
    if value is None:
        return "", "text"
    if isinstance(value, str):
        return value, "text"
    return json.dumps(value, ensure_ascii=False, default=_pydantic_default), "json"


def not_encodable_message(value: Any) -> str:
    return f"the agent returned {type(value).__name__}, which is not text or JSON-able"


def _pydantic_default(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# ---- the child -------------------------------------------------------------


class NotEncodable(TypeError):
    """The callable returned something that is neither text nor JSON-able: a bug, not bad luck."""


class Stopped(SystemExit):
    """Raised in the main thread by SIGTERM: unwinds the callable so its cleanup runs."""


class _Channel:
    """The frames going to the parent; the callable may report from any thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        self.send_bytes(encode_frame(message))

    def send_bytes(self, frame: bytes) -> None:
        data = memoryview(frame)
        with self._lock:
            while data:
                data = data[os.write(self._fd, data) :]


class ChildContext:
    """What the callable sees instead of a TaskContext: the same fields and methods, over frames."""

    def __init__(self, fields: dict[str, Any], channel: _Channel) -> None:
        self._channel = channel
        self._cancelled = False
        self.task_id: str = fields["task_id"]
        self.workflow_id: str = fields["workflow_id"]
        self.agent: str = fields["agent"]
        self.attempt: int = fields["attempt"]
        self.scope: str = fields["scope"]
        self.metadata: dict[str, Any] = fields.get("metadata") or {}
        self.options: dict[str, Any] = fields.get("options") or {}
        self.session_id: str | None = fields.get("session_id")
        self.batch_id: str | None = fields.get("batch_id")
        self.resume_session_id: str | None = fields.get("resume_session_id")
        self.workdir_roots: list[str] = fields.get("workdir_roots") or []

    def report_progress(self, percent: float | None = None, message: str | None = None) -> None:
        if percent is not None:
            percent = max(0.0, min(100.0, float(percent)))
        self._channel.send(
            {"type": "progress", "percent": percent, "message": None if message is None else str(message)}
        )

    def record_usage(self, usage: Any) -> None:
        """A sidequest.executors.base.ReportedUsage; filed under this task and attempt."""
        recorded_at = getattr(usage, "recorded_at", None)
        cost = getattr(usage, "cost_usd", None)
        model = getattr(usage, "model", None)
        self._channel.send(
            {
                "type": "usage",
                "model": None if model is None else str(model),
                "input_tokens": int(usage.input_tokens),
                "output_tokens": int(usage.output_tokens),
                "cache_creation_input_tokens": int(usage.cache_creation_input_tokens),
                "cache_read_input_tokens": int(usage.cache_read_input_tokens),
                "cost_usd": None if cost is None else float(cost),
                "recorded_at": recorded_at.isoformat() if hasattr(recorded_at, "isoformat") else None,
            }
        )

    def log(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """An entry of the task's run log; data that is not JSON goes as its text."""
        try:
            json.dumps(data)
        except (TypeError, ValueError):
            data = {"value": repr(data)}
        self._channel.send({"type": "log", "kind": str(kind), "message": str(message), "data": data})

    def save_state(self, session_id: str | None = None, batch_id: str | None = None) -> None:
        if session_id is not None:
            self.session_id = session_id
        if batch_id is not None:
            self.batch_id = batch_id
        self._channel.send({"type": "state", "session_id": session_id, "batch_id": batch_id})

    @property
    def is_cancelled(self) -> bool:
        """True once the parent asked the process to stop (the callable is being unwound)."""
        return self._cancelled

    def _cancel(self) -> None:
        self._cancelled = True


def _error_frame(exc: BaseException) -> dict[str, Any]:
    """What the parent needs to raise the same kind of failure: permanent, retryable, exit or plain."""
    import traceback

    base = sys.modules.get("sidequest.executors.base")
    kind = "error"
    retry_after = None
    code: Any = None
    if isinstance(exc, SystemExit):
        kind, code = "exit", exc.code
        if not isinstance(code, int | str | None):
            code = repr(code)
    elif isinstance(exc, LoadError | NotEncodable) or (base and isinstance(exc, base.PermanentError)):
        kind = "permanent"
    elif base is not None and isinstance(exc, base.RetryableError):
        kind, retry_after = "retryable", exc.retry_after
    cls = type(exc)
    return {
        "type": "error",
        "kind": kind,
        "module": cls.__module__,
        "name": cls.__qualname__,
        "message": _describe(exc),
        "retry_after": retry_after,
        "code": code,
        "traceback": "".join(traceback.format_exception(exc)[-20:]),
    }


def _describe(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # an exception whose __str__ fails still fails the attempt, with a word on why
        return f"(the {type(exc).__name__} could not be shown as text)"


def _run(fn: Callable[..., Any], prompt: str, ctx: ChildContext) -> Any:
    value = fn(prompt, ctx)
    if hasattr(value, "__await__"):  # an async callable (or a sync one returning an awaitable)
        import asyncio

        async def wait() -> Any:
            return await value

        value = asyncio.run(wait())
    return value


def _watch_parent(fd: int, ctx: ChildContext) -> None:
    """Reads the parent's side until it ends: the parent finished with us, or died. Either way, stop."""
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass
    ctx._cancel()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_GRACE)
    os._exit(EXIT_STOPPED)


def _read_start(fd: int) -> dict[str, Any]:
    decoder = FrameDecoder()
    while True:
        data = os.read(fd, 1 << 20)
        if not data:
            raise SystemExit("sidequest python child: the parent closed stdin before the start frame")
        for message in decoder.feed(data):
            return message


def _outcome(start: dict[str, Any], ctx: ChildContext) -> bytes:
    """Run the callable; the result or error as the frame to send."""
    try:
        fn = load_callable(start["callable"])
        value = _run(fn, start["prompt"], ctx)
        try:
            content, content_type = encode_result(value)
        except TypeError as exc:
            raise NotEncodable(not_encodable_message(value)) from exc
        return encode_frame({"type": "result", "content": content, "content_type": content_type})
    except Stopped:
        raise
    except BaseException as exc:  # every failure of the agent goes to the parent
        return encode_frame(_error_frame(exc))


def main() -> None:
    proto_in, proto_out = os.dup(0), os.dup(1)  # os.dup: not inherited by the agent's own processes
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # a crash should not lose what was printed
    channel = _Channel(proto_out)
    ctx: ChildContext | None = None

    def stop(signum: int, frame: Any) -> None:
        if ctx is not None:
            ctx._cancel()
        raise Stopped(EXIT_STOPPED)

    signal.signal(signal.SIGTERM, stop)
    try:
        start = _read_start(proto_in)
        ctx = ChildContext(start["context"], channel)
        threading.Thread(target=_watch_parent, args=(proto_in, ctx), daemon=True).start()
        channel.send_bytes(_outcome(start, ctx))
    except Stopped:
        _exit(EXIT_STOPPED)
    _exit(0)


def _exit(status: int) -> None:
    """End now: the attempt is over, and nothing the callable left running may hold it open."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream is no reason to linger
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
