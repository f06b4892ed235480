"""The HTTP face of `sidequest serve`: MCP over streamable HTTP at /mcp, REST and events at
/api/v1, and /health.

Local-only by default, and still guarded: any web page the user opens can
reach 127.0.0.1, so every route but /health needs the bearer token from a
0600 file in the data dir, and Host/Origin are checked against DNS rebinding.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sidequest import __version__

MCP_PATH = "/mcp"
PUBLIC_PATHS = frozenset({"/health"})
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class QuietUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: ours drains the engine, and uvicorn's would
    re-raise the signal after shutdown, so the process would die by it instead of exiting 0."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def stop(self) -> None:
        self.should_exit = True


def load_or_create_token(path: Path) -> str:
    """The token is made once and reused, so a client configured with it keeps working across restarts."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        token = ""
    if token:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # someone loosened it; a readable token is a leaked token
        return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never world-readable, not even briefly
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    os.replace(tmp, path)
    return token


def _json_error(code: str, message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


class LocalOnly:
    """Host and Origin must name this server (DNS rebinding: a web page whose name resolves to
    127.0.0.1 would otherwise be same-origin with us). Covers every route, REST included."""

    def __init__(self, app: ASGIApp, host: str) -> None:
        self.app = app
        settings = transport_security(host)
        self._hosts = {h.removesuffix(":*") for h in settings.allowed_hosts}
        self._origins = {o.removesuffix(":*") for o in settings.allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            host = headers.get(b"host", b"").decode("latin-1")
            origin = headers.get(b"origin", b"").decode("latin-1")
            if _strip_port(host) not in self._hosts:
                await _json_error("forbidden", f"Host {host!r} is not this server", 421)(scope, receive, send)
                return
            if origin and _strip_port(origin) not in self._origins:
                await _json_error("forbidden", f"Origin {origin!r} may not call this server", 403)(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


def _strip_port(value: str) -> str:
    head, sep, tail = value.rpartition(":")
    return head if sep and tail.isdigit() and not head.endswith(":") else value


class BearerAuth:
    """Pure ASGI middleware (BaseHTTPMiddleware would buffer the SSE streams MCP relies on)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS and not self._authorized(scope):
            response = _json_error(
                "unauthorized",
                "send 'Authorization: Bearer <token>' (the token file is in the data dir)",
                401,
                {"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        supplied = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(supplied, self._expected)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuse a request body over `limit` bytes before anything parses it: the engine's own
    request limit is checked on the parsed models, and parsing 20 MB of JSON costs far more
    memory than 20 MB. The limit leaves room for JSON escaping of a request the engine accepts."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(scope, receive, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = (
            f"the request body is over {self.limit} bytes; a submit may hold at most max_request_bytes "
            "(config) of prompt, metadata, tags and options: put large inputs in a file and pass its path"
        )
        await _json_error("too_large", message, 413)(scope, receive, send)


def transport_security(host: str) -> TransportSecuritySettings:
    """Only our own host names may appear in Host/Origin; a rebinding attacker's name is refused."""
    hosts = list(_LOCAL_HOSTS)
    if host not in hosts and host not in ("0.0.0.0", "::"):
        hosts.append(f"[{host}]" if ":" in host else host)
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{h}:*" for h in hosts],
        allowed_origins=[f"{scheme}://{h}:*" for h in hosts for scheme in ("http", "https")],
    )


def build_app(
    server: MCPServer,
    token: str,
    host: str = "127.0.0.1",
    rest: ASGIApp | None = None,
    problem: Callable[[], str | None] | None = None,
    max_body: int = 8 << 20,
) -> ASGIApp:
    """`rest` is the /api/v1 app (the daemon has one; a bare MCP server in tests need not).
    `problem` says why the daemon cannot serve (its store failed); /health then answers 503."""
    mcp_app = server.streamable_http_app(
        streamable_http_path=MCP_PATH, transport_security=transport_security(host)
    )

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        # Mount does not run a sub-app's lifespan; the MCP session manager must run for /mcp to work.
        async with server.session_manager.run():
            yield

    async def health(_: Request) -> JSONResponse:
        body: dict[str, object] = {"status": "ok", "version": __version__, "pid": os.getpid()}
        failure = problem() if problem is not None else None
        if failure is not None:
            body.update(status="store_unavailable", code="store_unavailable", message=failure)
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)

    routes = [Route("/health", health)]
    if rest is not None:
        from sidequest.server.rest import rest_mount

        routes.append(rest_mount(rest))
    routes.append(Mount("/", app=mcp_app))
    app = Starlette(routes=routes, lifespan=lifespan)
    return LocalOnly(BearerAuth(BodyLimit(app, max_body), token), host)
