"""The MCP layer: tools, resources and notifications over the `trainer` package."""

from .server import build_server
from .state import ServerSettings

__all__ = ["ServerSettings", "build_server"]
