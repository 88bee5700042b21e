"""Every use of the MCP SDK's private attributes, in one place (SDK 2.3 offers no public way to these).

tests/mcp/test_sdk_private.py pins what each relies on, and pyproject.toml's `mcp` pin covers the versions it was
checked against: an SDK upgrade that moves one fails that test instead of silently changing behaviour.
"""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer
from mcp.server.session import ServerSession


def lowlevel_server(mcp: MCPServer[Any]) -> Any:
    """The low-level server under MCPServer: to register 2025-era subscribe handlers and run with our own options."""
    return mcp._lowlevel_server


def connection_of(session: ServerSession) -> Any:
    """The session's connection: the only per-connection identity and teardown hook (`state`, `exit_stack`)."""
    return session._connection
