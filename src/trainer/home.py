"""Where runs live by default: $MCP_LOCAL_HOME, else ~/.mcp-local (absolute, since MCP hosts pick the cwd)."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "MCP_LOCAL_HOME"


def default_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".mcp-local").expanduser().resolve()
