"""resume_run over stdio, training for real: a run whose worker was killed, or that was cancelled, continues from its
checkpoint as the same run and ends with exactly the adapter and losses of a run that was never stopped."""

from __future__ import annotations

import json
import shutil
import signal
from contextlib import suppress
from pathlib import Path
from typing import Any

import anyio
import mlx.core as mx
import psutil
import pytest

from mcp import Client
from tests.conftest import tiny_run_config
from tests.mcp.test_stdio_e2e import TIMEOUT, server_params

pytestmark = pytest.mark.slow
ITERS = 60
SAVE_EVERY = 10


def _config(model: Path, data: Path) -> dict[str, Any]:
    return tiny_run_config(model, data, iters=ITERS, save_every=SAVE_EVERY, steps_per_report=1, dropout=0.1)


async def _status(client: Client, run_id: str, wait: float = 0) -> dict[str, Any]:
    result = await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": wait, "memory_samples": 0})
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def _until(client: Client, run_id: str, done: Any) -> dict[str, Any]:
    with anyio.fail_after(TIMEOUT):
        status = await _status(client, run_id)
        while not done(status):
            status = await _status(client, run_id, wait=5)
        return status


async def _at_iteration(client: Client, run_id: str, iteration: int) -> dict[str, Any]:
    """Polled without the long-poll's settling (2 s): the tiny run trains 60 steps in about 3 s."""
    with anyio.fail_after(TIMEOUT):
        while (status := await _status(client, run_id))["iteration"] < iteration:
            assert not _final(status), status
            await anyio.sleep(0.05)
    return status


def _final(status: dict[str, Any]) -> bool:
    return status["state"] in ("succeeded", "failed", "cancelled")


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    """Each step's loss as last reported (a resumed attempt's reports replace the steps it trained again)."""
    return {e["iteration"]: e["train_loss"] for e in _events(run_dir) if e["type"] == "train_report"}


def _adapter(status: dict[str, Any]) -> dict[str, mx.array]:
    return dict(mx.load(str(Path(status["adapter_path"]) / "adapters.safetensors")))  # type: ignore[arg-type]


async def test_killed_and_cancelled_runs_resume_to_the_uninterrupted_runs_adapter_bit_for_bit(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    async with Client(server_params(tmp_path / "home"), mode="legacy") as client:

        async def start() -> str:
            return await _start(client, _config(tiny_model, data))

        whole = await _until(client, await start(), _final)
        assert whole["state"] == "succeeded", whole["error"]

        # a worker killed mid-run (SIGKILL, between or during steps): the run fails, and resumes from a save_every
        killed = await start()
        status = await _at_iteration(client, killed, SAVE_EVERY + 5)
        psutil.Process(_worker_pid(Path(status["run_dir"]))).send_signal(signal.SIGKILL)
        status = await _until(client, killed, _final)
        assert status["state"] == "failed" and status["error"]["kind"] == "crashed"
        assert "resume_run continues from it" in status["error"]["message"]

        # a cancelled run keeps a checkpoint of the step it stopped at; a changed dataset refuses the resume
        cancelled = await start()
        await _at_iteration(client, cancelled, 25)
        assert not (await client.call_tool("cancel_run", {"run_id": cancelled})).is_error
        train = data / "train.jsonl"
        original = train.read_bytes()
        train.write_bytes(original + original.splitlines(keepends=True)[0])
        refused = await client.call_tool("resume_run", {"run_id": cancelled})
        assert refused.is_error and "dataset" in refused.content[0].text and "force" in refused.content[0].text  # type: ignore[union-attr]
        train.write_bytes(original)

        for run_id in (killed, cancelled):
            resumed = await client.call_tool("resume_run", {"run_id": run_id})
            assert not resumed.is_error, resumed.content
            plan = resumed.structured_content
            assert plan is not None and plan["attempt"] == 2 and plan["from_step"] > 0
            if run_id == killed:
                assert plan["from_step"] % SAVE_EVERY == 0
            status = await _until(client, run_id, _final)
            assert status["state"] == "succeeded" and status["attempt"] == 2, status["error"]
            adapter, reference = _adapter(status), _adapter(whole)
            assert adapter.keys() == reference.keys()
            assert all(mx.array_equal(adapter[k], reference[k]).item() for k in adapter)
            assert _losses(Path(status["run_dir"])) == _losses(Path(whole["run_dir"]))
            events = _events(Path(status["run_dir"]))
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # one history, no gap
            assert [e.get("attempt", 1) for e in events if e["type"] == "started"] == [1, 2]
            assert [e["iteration"] for e in events if e["type"] == "resumed"] == [plan["from_step"]]

        again = await client.call_tool("resume_run", {"run_id": killed})
        assert again.is_error and "already succeeded" in again.content[0].text  # type: ignore[union-attr]


async def _start(client: Client, config: dict[str, Any]) -> str:
    started = await client.call_tool("start_qlora_run", {"config": config})
    assert not started.is_error, started.content
    return str(started.structured_content["run_id"])  # type: ignore[index]


async def test_a_server_killed_mid_run_leaves_training_that_ends_with_the_uninterrupted_adapter(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    home, config = tmp_path / "home", _config(tiny_model, tiny_data)
    async with Client(server_params(home), mode="legacy") as client:
        whole = await _until(client, await _start(client, config), _final)
    found: dict[str, Any] = {}
    with suppress(Exception):  # the killed server's pipes break under the client
        async with Client(server_params(home), mode="legacy") as client:
            found["run_id"] = run_id = await _start(client, config)
            await _until(client, run_id, lambda s: s["iteration"] >= 10)
            server = (await client.call_tool("profile_memory", {})).structured_content["server"]  # type: ignore[index]
            psutil.Process(server["pid"]).send_signal(signal.SIGKILL)
            await anyio.sleep(30)
    async with Client(server_params(home), mode="legacy") as client:
        status = await _until(client, found["run_id"], _final)
    assert status["state"] == "succeeded" and status["attempt"] == 1, status["error"]
    adapter, reference = _adapter(status), _adapter(whole)
    assert all(mx.array_equal(adapter[k], reference[k]).item() for k in reference)
    assert _losses(Path(status["run_dir"])) == _losses(Path(whole["run_dir"]))


def _worker_pid(run_dir: Path) -> int:
    return int(next(e["pid"] for e in reversed(_events(run_dir)) if e["type"] == "started"))
