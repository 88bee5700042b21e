"""Every line on the stdio wire gets the answer JSON-RPC prescribes, from the real server process (raw lines, no SDK
client: a client library would never send these)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mcp_local.wire import screen

pytestmark = pytest.mark.slow


class RawWire:
    def __init__(self, home: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mcp_local", "--home", str(home), "--log-level", "ERROR"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def send(self, line: str | dict[str, Any] | list[Any]) -> None:
        assert self.process.stdin is not None
        text = line if isinstance(line, str) else json.dumps(line)
        self.process.stdin.write(text.encode() + b"\n")
        self.process.stdin.flush()

    def receive(self, timeout: float = 30) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, "no reply"
        reply: dict[str, Any] = json.loads(self.process.stdout.readline())
        return reply


def test_malformed_messages_get_the_spec_errors_and_the_server_keeps_serving(tmp_path: Path) -> None:
    wire = RawWire(tmp_path)
    try:
        wire.send(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "1"},
                },
            }
        )
        assert wire.receive(timeout=120)["id"] == 1  # a server start on a loaded machine (load 5 on 2 cores) is slow
        wire.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        nested = '{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"list_runs","arguments":'
        nested += '{"a":' * 5000 + "1" + "}" * 5000 + "}}"
        cases: list[tuple[Any, int | None, int, str]] = [
            ([{"jsonrpc": "2.0", "id": 2, "method": "tools/list"}], None, -32600, "batches"),
            ({"jsonrpc": "2.0", "id": 3}, 3, -32600, 'no "method"'),
            ({"jsonrpc": "1.0", "id": 4, "method": "tools/list"}, 4, -32600, '"jsonrpc" must be "2.0"'),
            (nested, 5, -32600, "nested too deeply"),
            ("{not json", None, -32700, "Parse error"),
            ('"just a string"', None, -32600, "a JSON object"),
        ]
        for line, request_id, code, says in cases:
            wire.send(line)
            reply = wire.receive()
            assert reply["id"] == request_id and reply["error"]["code"] == code and says in reply["error"]["message"]
        wire.send({"jsonrpc": "2.0", "id": 9, "method": "tools/list"})
        assert wire.receive()["result"]["tools"]
    finally:
        wire.process.kill()
        wire.process.wait()
        for stream in (wire.process.stdin, wire.process.stdout):
            assert stream is not None
            stream.close()


def test_a_valid_message_passes_the_screen() -> None:
    assert screen('{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}') is None
    assert screen('{"jsonrpc": "2.0", "method": "notifications/initialized"}') is None
    assert screen('{"jsonrpc": "2.0", "id": 7, "result": {}}') is None
