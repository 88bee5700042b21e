"""`mcp-local --http`: a real server process over Streamable HTTP, with its bearer token and Host/Origin checks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp.client.streamable_http import streamable_http_client

from mcp import Client
from tests.trainer.helpers import config, fake_env

pytestmark = pytest.mark.slow
TMP = tempfile.gettempdir()  # pytest's folders, where the tests' models and data are: an allowed root
TOKEN = "test-token-0123456789"
START_TIMEOUT = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(home: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mcp_local", "--http", "--port", str(port), "--home", str(home), "--root", TMP, *extra],
        env={**os.environ, **fake_env("succeed")},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def _wait_listening(port: int) -> None:
    with anyio.fail_after(START_TIMEOUT):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.1)
                continue
            await stream.aclose()
            return


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = _free_port()
    process = _start(tmp_path / "home", port, "--token", TOKEN)
    try:
        yield f"http://127.0.0.1:{port}/mcp", process
    finally:
        process.terminate()
        process.communicate(timeout=20)  # reaps it and closes its stderr pipe


async def test_http_needs_the_token_and_this_servers_host_and_origin(
    server: tuple[str, subprocess.Popen[bytes]], fake_model: Path, tiny_data: Path
) -> None:
    url, _ = server
    await _wait_listening(int(url.split(":")[2].split("/")[0]))
    body = '{"jsonrpc": "2.0", "id": 1, "method": "ping"}'
    json_headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx2.AsyncClient() as http:
        assert (await http.post(url, headers=json_headers, content=body)).status_code == 401
        wrong = {**json_headers, "Authorization": "Bearer not-the-token"}
        assert (await http.post(url, headers=wrong, content=body)).status_code == 401
        foreign_host = {**json_headers, **auth, "Host": "evil.example"}
        assert (await http.post(url, headers=foreign_host, content=body)).status_code == 403
        foreign_origin = {**json_headers, **auth, "Origin": "http://evil.example"}
        assert (await http.post(url, headers=foreign_origin, content=body)).status_code == 403
    async with httpx2.AsyncClient(headers=auth) as http:
        for mode in ("legacy", "auto"):
            async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
                names = {tool.name for tool in (await client.list_tools()).tools}
                assert {"start_qlora_run", "run_status"} <= names
                started = await client.call_tool("start_qlora_run", {"config": config(fake_model, tiny_data)})
                assert not started.is_error, started.content


async def test_without_a_token_one_is_made_and_written_to_stderr(tmp_path: Path) -> None:
    port = _free_port()
    process = _start(tmp_path / "home", port)
    try:
        await _wait_listening(port)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=20)
    line = next(line for line in stderr.decode().splitlines() if "Authorization: Bearer" in line)
    assert len(line.rsplit(" ", 1)[1]) >= 40
