"""Every tool, called with arguments drawn by Hypothesis from its own input schema: no crash, no hang over 5 s, no
traceback or reasonless error, and the server still answers afterwards."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis_jsonschema import from_schema

from mcp import Client
from tests.mcp.conftest import fake_server

pytestmark = pytest.mark.slow
EXAMPLES = 25
CALL_LIMIT_S = 5.0


def _draw(schema: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """`count` argument objects valid for `schema`, edge cases first (empty, huge, unicode, nested)."""
    found: list[dict[str, Any]] = []

    @settings(max_examples=count, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(from_schema(schema))
    def collect(arguments: dict[str, Any]) -> None:
        found.append(arguments)

    collect()
    return found


async def test_every_tool_survives_arguments_drawn_from_its_schema(tmp_path: Path) -> None:
    async with Client(fake_server(tmp_path / "home", max_queued=3), mode="legacy") as client:
        tools = (await client.list_tools()).tools
        assert len(tools) >= 8
        slowest = 0.0
        for tool in tools:
            for arguments in _draw(tool.input_schema, EXAMPLES):
                start = time.monotonic()
                with anyio.fail_after(CALL_LIMIT_S):  # a hang fails here
                    result = await client.call_tool(tool.name, arguments)
                slowest = max(slowest, time.monotonic() - start)
                text = "".join(getattr(block, "text", "") for block in result.content)
                shown = json.dumps(arguments)[:300]
                assert "Traceback" not in text, (tool.name, shown, text)
                if result.is_error:  # a refusal says why, past the SDK's prefix
                    reason = text.split(f"Error executing tool {tool.name}:", 1)[-1].strip()
                    assert len(reason) > 10, (tool.name, shown, text)
        assert (await client.list_tools()).tools  # alive after all of it
        assert slowest < CALL_LIMIT_S
