"""The stdio wire's front door: every line a host sends gets an answer the JSON-RPC spec allows.

The SDK's stdio transport drops a line it cannot read as one MCP message, so a client that sent a batch array, a
message without a method, another JSON-RPC version, broken JSON or JSON nested past Python's recursion limit waited
forever. Each such line is answered here with the spec's error (-32700 parse error, -32600 invalid request), with its
id where it has a usable one; only lines that read as MCP messages reach the SDK.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from mcp.shared.message import SessionMessage
from mcp.types import INVALID_REQUEST, PARSE_ERROR, ErrorData, JSONRPCError, jsonrpc_message_adapter
from pydantic import ValidationError

_ID = re.compile(r'^\{\s*(?:"jsonrpc"\s*:\s*"2\.0"\s*,\s*)?"id"\s*:\s*(-?\d+|"[^"\\]*")')


def claim_stdin() -> anyio.AsyncFile[str]:
    """The host's stdin on a private descriptor, fd 0 pointed at /dev/null (children must not read the wire)."""
    private = os.dup(0)
    os.set_inheritable(private, False)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return anyio.wrap_file(open(private, encoding="utf-8", errors="replace"))  # noqa: SIM115  (lives as the server)


def screen(line: str) -> JSONRPCError | None:
    """None for a line that reads as one MCP message; else the error to answer it with."""
    try:
        data = json.loads(line)
    except RecursionError:
        found = _ID.search(line[:500])
        request_id = json.loads(found.group(1)) if found else None
        return _error(request_id, INVALID_REQUEST, "Invalid Request: the message is nested too deeply")
    except ValueError as exc:
        return _error(None, PARSE_ERROR, f"Parse error: {exc}")
    if isinstance(data, list):
        return _error(None, INVALID_REQUEST, "Invalid Request: MCP does not take JSON-RPC batches; send one message")
    if not isinstance(data, dict):
        return _error(None, INVALID_REQUEST, "Invalid Request: a message is a JSON object")
    request_id = data.get("id") if isinstance(data.get("id"), str | int) else None
    if data.get("jsonrpc") != "2.0":
        return _error(request_id, INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"')
    if "method" not in data and "result" not in data and "error" not in data:
        return _error(request_id, INVALID_REQUEST, 'Invalid Request: no "method" (nor a "result" or "error")')
    try:
        jsonrpc_message_adapter.validate_python(data, by_name=False)
    except (ValidationError, RecursionError):
        return _error(request_id, INVALID_REQUEST, "Invalid Request: not a JSON-RPC request, notification or response")
    return None


def _error(request_id: Any, code: int, message: str) -> JSONRPCError:
    return JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=code, message=message[:300]))


class ScreenedLines:
    """Lines for `stdio_server(stdin=...)`: valid ones pass, the others are answered through the write stream."""

    def __init__(self, source: anyio.AsyncFile[str]) -> None:
        self._source = source
        self._write: MemoryObjectSendStream[SessionMessage] | None = None
        self._ready = anyio.Event()

    def answer_through(self, write: MemoryObjectSendStream[SessionMessage]) -> None:
        self._write = write
        self._ready.set()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        async for line in self._source:
            if not line.strip():
                continue
            error = screen(line)
            if error is None:
                yield line
                continue
            await self._ready.wait()
            assert self._write is not None
            await self._write.send(SessionMessage(error))
