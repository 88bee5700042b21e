"""Runs outlive the server: killed or closed by its host, a server leaves its workers training, and the next server
on the same home follows them to the end, with every event exactly once."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from mcp import Client, StdioServerParameters
from tests.trainer.helpers import config, fake_env, fake_runner

pytestmark = pytest.mark.slow
START_TIMEOUT = 60  # cold interpreter starts on a loaded 2-core machine
ITERS = 100  # 10 s of fake training: the worker is still at it when its server is gone


def fake_server_params(home: Path, mode: str, **env: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_local", "--home", str(home), "--log-level", "WARNING", "--root", tempfile.gettempdir()],
        env={"PATH": os.environ.get("PATH", ""), **fake_env(mode), "FAKE_STEP_S": "0.1", **env},
    )


async def _wait_training(client: Client, run_id: str) -> dict[str, Any]:
    with anyio.fail_after(START_TIMEOUT):
        while True:
            result = await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 5})
            status = result.structured_content
            assert status is not None
            if status["iteration"] > 0:
                return status


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


async def _start_and_leave(home: Path, fake_model: Path, tiny_data: Path, how: str) -> tuple[str, int]:
    """Start a run on a server, wait until it trains, then end that server (`kill`, or `close` its stdin as a host
    does); returns the run id and its worker's pid."""
    found: dict[str, Any] = {}
    with anyio.fail_after(START_TIMEOUT), suppress(Exception):  # a killed server's pipes break under the client
        async with Client(fake_server_params(home, "slow"), mode="legacy") as client:
            config_ = config(fake_model, tiny_data, iters=ITERS)
            started = await client.call_tool("start_qlora_run", {"config": config_})
            found["run_id"] = run_id = started.structured_content["run_id"]
            await _wait_training(client, run_id)
            profile = (await client.call_tool("profile_memory", {})).structured_content
            found["worker_pid"] = profile["workers"][0]["pid"]
            server = psutil.Process(profile["server"]["pid"])
            if how in ("kill", "sigterm"):
                server.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
                server.wait(timeout=10)  # a SIGTERM ends the server promptly, its lifespan closed
    return found["run_id"], found["worker_pid"]


@pytest.mark.parametrize("how", ["kill", "close", "sigterm"])
async def test_a_run_outlives_its_server_and_the_next_server_follows_it_to_the_end(
    tmp_path: Path, fake_model: Path, tiny_data: Path, how: str
) -> None:
    home = tmp_path / "home"
    run_id, worker_pid = await _start_and_leave(home, fake_model, tiny_data, how)
    assert psutil.pid_exists(worker_pid), "the worker must keep training without its server"
    async with Client(fake_server_params(home, "slow"), mode="legacy") as client:
        with anyio.fail_after(2):  # re-attached at once: the run is still running, not orphaned
            status = (await client.call_tool("run_status", {"run_id": run_id})).structured_content
        assert status["state"] == "running" and status["error"] is None
        with anyio.fail_after(START_TIMEOUT):
            while status["state"] == "running":
                result = await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 5})
                status = result.structured_content
        assert status["state"] == "succeeded", status["error"]
        assert status["iteration"] == ITERS and status["metrics"]["last_val_loss"] == 0.5
    events = _events(Path(status["run_dir"]))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # no gap, no duplicate
    starts = [e for e in events if e["type"] == "started"]
    assert len(starts) == 1 and starts[0]["pid"] == worker_pid  # one worker, never restarted
    assert not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE


async def test_two_servers_on_one_home_start_each_queued_run_once_in_order(
    tmp_path: Path, fake_model: Path, tiny_data: Path
) -> None:
    async with (
        fake_runner(tmp_path, "succeed", detach=True) as first,
        fake_runner(tmp_path, "succeed", detach=True) as second,
    ):
        runs = [await (first, second)[i % 2].submit(config(fake_model, tiny_data)) for i in range(5)]
        done = [await (first, second)[i % 2].wait_until_done(r.id, START_TIMEOUT) for i, r in enumerate(runs)]
        seen_by_other = [(second, first)[i % 2].get(r.id) for i, r in enumerate(runs)]
    assert [d.state.value for d in done] == ["succeeded"] * 5
    assert [s.state.value for s in seen_by_other] == ["succeeded"] * 5  # both servers followed every run
    for run in runs:
        assert sum(e["type"] == "started" for e in _events(Path(run.run_dir))) == 1  # started exactly once
    started = [d.started_at or 0 for d in done]
    assert started == sorted(started)  # FIFO across both servers
