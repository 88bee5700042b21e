"""The server as a host starts and stops it: the SDK imported once per start (the preload re-exec comes first), the
decode kernel never built inside a tool call, and a clean exit every time after a model was loaded."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from trainer.engine import decode_kernel

SHUTDOWNS = 50
log = logging.getLogger(__name__)


def _server(home: Path, root: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | (extra_env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "mcp_local", "--home", str(home), "--root", str(root), "--log-level", "WARNING"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _call(server: subprocess.Popen[str], message: dict[str, Any]) -> dict[str, Any] | None:
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")
    server.stdin.flush()
    if "id" not in message:
        return None
    while True:
        reply = json.loads(server.stdout.readline())
        if reply.get("id") == message["id"]:
            return dict(reply)


def _start_load_and_close(home: Path, model: Path) -> tuple[int, str, float]:
    """initialize, tools/list (timed from the spawn), load_model, then close stdin as a host does."""
    spawned = time.perf_counter()
    server = _server(home, model.parent)
    hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
    _call(server, {"id": 1, "method": "initialize", "params": hello})
    _call(server, {"method": "notifications/initialized"})
    _call(server, {"id": 2, "method": "tools/list"})
    first_list = time.perf_counter() - spawned
    load = {"name": "load_model", "arguments": {"path": str(model)}}
    loaded = _call(server, {"id": 3, "method": "tools/call", "params": load})
    assert loaded is not None and not loaded["result"].get("isError"), loaded
    assert server.stdin is not None
    server.stdin.close()
    code = server.wait(timeout=30)
    assert server.stderr is not None and server.stdout is not None
    stderr = server.stderr.read()
    server.stdout.close()
    server.stderr.close()
    return code, stderr, first_list


@pytest.mark.slow
def test_fifty_clean_shutdowns_after_a_model_was_loaded(tmp_path: Path, tiny_model: Path) -> None:
    with ThreadPoolExecutor(2) as pool:  # two servers at a time on the one home, as two host windows would
        ended = list(pool.map(lambda _: _start_load_and_close(tmp_path / "home", tiny_model), range(SHUTDOWNS)))
    for attempt, (code, stderr, _) in enumerate(ended):
        assert code == 0 and "terminate called" not in stderr, (attempt, code, stderr[-2000:])
    starts = sorted(first_list for _, _, first_list in ended)
    log.warning("first tools/list after spawn: median %.3f s, max %.3f s", starts[len(starts) // 2], starts[-1])


def test_the_sdk_is_imported_once_per_start(tmp_path: Path) -> None:
    """The re-exec with the preloads comes before the heavy imports (bench/cold_start.py times the start)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mcp_local", "--home", str(tmp_path), "--log-level", "WARNING"],
        input="", capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    imports = [line for line in done.stderr.splitlines() if re.search(r"\|\s+mcp_local\.server$", line.rstrip())]
    assert len(imports) == 1, done.stderr[-3000:]


def test_a_kernel_being_built_never_holds_a_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the background build runs (the set-up's build command, in a subprocess), load() answers at once: decode
    uses MLX's own operations meanwhile."""
    monkeypatch.setattr(decode_kernel, "_target", lambda: Path("/nonexistent/kernel.so"))
    commands: list[list[str]] = []

    def slow_build(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        time.sleep(2)
        return subprocess.CompletedProcess(command, 0, "", "decode kernel: built")

    monkeypatch.setattr(subprocess, "run", slow_build)  # the module calls subprocess.run
    thread = decode_kernel.build_in_background()
    assert thread is not None and decode_kernel._building.is_set()
    tic = time.perf_counter()
    assert decode_kernel.load() is None
    assert time.perf_counter() - tic < 0.5  # answered, not waited
    thread.join(timeout=30)
    assert not decode_kernel._building.is_set()
    assert commands == [[sys.executable, "-m", "trainer.engine.decode_kernel"]]
