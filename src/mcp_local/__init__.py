"""The MCP layer: tools, resources and notifications over the `trainer` package.

Imports are lazy, so that `python -m mcp_local` can re-execute itself (preload.py) before the SDK is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import build_server
    from .state import ServerSettings

__all__ = ["ServerSettings", "build_server"]


def __getattr__(name: str) -> Any:
    if name == "build_server":
        from .server import build_server

        return build_server
    if name == "ServerSettings":
        from .state import ServerSettings

        return ServerSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
