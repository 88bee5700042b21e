"""`mcp-local --http`: the server over Streamable HTTP, for remote and shared use.

Every request needs `Authorization: Bearer <token>` (401 otherwise) and a `Host` (and, when a browser sends one, an
`Origin`) naming this server (403 otherwise: DNS rebinding). It listens on 127.0.0.1 unless told otherwise; the token
is generated and written to stderr when none is given.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from mcp.server import MCPServer

log = logging.getLogger(__name__)
LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str = ""
    #: extra host names clients may use (a reverse proxy's name); the local names and `host` are always allowed
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)

    def hosts(self) -> frozenset[str]:
        names = {*LOCAL_NAMES, self.host, *self.allowed_hosts}
        return frozenset(names | {f"{name}:{self.port}" for name in names})


class Guard:
    """ASGI middleware in front of the SDK's app: Host and Origin first (403), then the bearer token (401)."""

    def __init__(self, app: App, settings: HttpSettings) -> None:
        self.app = app
        self.token = settings.token.encode()
        self.hosts = settings.hosts()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: the MCP server's own startup and shutdown
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        if headers.get("host", "") not in self.hosts or (origin and urlsplit(origin).netloc not in self.hosts):
            await _reply(send, 403, "forbidden: Host or Origin is not this server's (DNS rebinding protection)")
            return
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
            await _reply(send, 401, "unauthorized: send Authorization: Bearer <token>", bearer=True)
            return
        await self.app(scope, receive, send)


async def _reply(send: Send, status: int, text: str, *, bearer: bool = False) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8")]
    if bearer:
        headers.append((b"www-authenticate", b'Bearer realm="mcp-local"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text.encode()})


def token_or_new(given: str | None) -> str:
    """The token to require: the one given, else a new one, announced on stderr (the only place it appears)."""
    if given:
        return given
    token = secrets.token_urlsafe(32)
    sys.stderr.write(f"mcp-local: no --token given; clients must send  Authorization: Bearer {token}\n")
    sys.stderr.flush()
    return token


async def serve_http(mcp: MCPServer[Any], settings: HttpSettings) -> None:
    app = Guard(mcp.streamable_http_app(host=settings.host), settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", lifespan="on")
    log.info("serving MCP over HTTP at http://%s:%d/mcp", settings.host, settings.port)
    await uvicorn.Server(config).serve()
