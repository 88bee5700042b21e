from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mcp.types import CallToolResult

from mcp_local import ServerSettings, build_server
from tests.trainer.helpers import fake_env


def fake_server(home: Path, mode: str = "succeed", **settings: Any):  # type: ignore[no-untyped-def]
    """A server whose runs train with the fake backend in real worker subprocesses."""
    return build_server(ServerSettings(home=home, worker_env=fake_env(mode), **settings))


def text_json(result: CallToolResult) -> tuple[str, dict[str, Any]]:
    """Split a tool result's text into its summary line and the JSON below it."""
    block = result.content[0]
    assert block.type == "text"
    summary, _, body = block.text.partition("\n")
    return summary, json.loads(body)


def without_nulls(data: Any) -> Any:
    """Structured content as its text copy writes it (nulls left out to save the model's tokens)."""
    if isinstance(data, dict):
        return {k: without_nulls(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [without_nulls(v) for v in data]
    return data
