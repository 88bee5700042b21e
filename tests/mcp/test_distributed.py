"""Data-parallel runs through the MCP server over stdio: two processes on the CPU's ring backend (loopback) train the
tiny model to the losses of one process on the same global batch; a rank's death, a hang and a cancel end the whole
group, and no process of it is left."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from mcp import Client
from tests.conftest import tiny_run_config
from tests.mcp.test_stdio_e2e import TIMEOUT, follow_to_end, server_params

pytestmark = pytest.mark.slow
GROUP_GONE_S = 10.0
#: stands in for ssh (no SSH server here): records the host it was asked for, then runs the command on this machine
FAKE_SSH = """#!/bin/bash
while [[ "$1" == -* ]]; do [[ "$1" == "-o" ]] && shift; shift; done
echo "$1" >> "$FAKE_SSH_LOG"
shift
exec env -i PATH="$PATH" HOME="$HOME" bash -c "$*"
"""


def config(model: Path, data: Path, processes: int, iters: int = 8, **overrides: Any) -> dict[str, Any]:
    settings = {"iters": iters, "steps_per_report": 1, "steps_per_eval": 4, "val_batches": 2} | overrides
    return tiny_run_config(model, data, num_processes=processes, **settings)


async def train_losses(client: Client, run_id: str) -> list[float]:
    metrics = await client.read_resource(f"runs://{run_id}/metrics")
    reports = json.loads(metrics.contents[0].text)["train"]  # type: ignore[union-attr]
    return [r["train_loss"] for r in reports]


async def started_group(client: Client, model: Path, data: Path) -> tuple[str, psutil.Process, list[psutil.Process]]:
    """A 2-process run that has trained a step: its id, rank 0 and the other rank."""
    started = await client.call_tool("start_qlora_run", {"config": config(model, data, 2, iters=100_000)})
    run_id = started.structured_content["run_id"]  # type: ignore[index]
    with anyio.fail_after(TIMEOUT):
        while True:
            status = (await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 5})).structured_content
            if status and status["iteration"] > 1:
                break
    worker = (await client.call_tool("profile_memory", {})).structured_content["workers"][0]  # type: ignore[index]
    assert worker["run_id"] == run_id and len(worker["rank_peaks_gb"]) == 2
    rank0 = psutil.Process(worker["pid"])
    return run_id, rank0, rank0.children()


def assert_all_gone(processes: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(processes, timeout=GROUP_GONE_S)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive


async def test_two_ring_processes_train_like_one_on_the_same_global_batch(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    async with Client(server_params(tmp_path / "home"), mode="legacy") as client:
        losses, statuses = {}, {}
        for processes, layerwise in ((1, False), (2, False), (2, True)):
            run = config(tiny_model, tiny_data, processes, layerwise=layerwise)
            started = await client.call_tool("start_qlora_run", {"config": run})
            run_id = started.structured_content["run_id"]  # type: ignore[index]
            statuses[processes] = await follow_to_end(client, run_id, [])
            assert statuses[processes]["state"] == "succeeded", statuses[processes]
            losses[processes, layerwise] = await train_losses(client, run_id)
        memory = await client.read_resource(f"runs://{statuses[2]['id']}/memory")
        ranks = {s["rank"] for s in json.loads(memory.contents[0].text)["samples"]}  # type: ignore[union-attr]
    one = losses[1, False]
    assert len(one) == 8 and one[-1] < one[0]  # it trained
    for two in (losses[2, False], losses[2, True]):
        assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5, losses
    assert statuses[1]["metrics"]["trained_tokens"] == statuses[2]["metrics"]["trained_tokens"]
    assert ranks == {0, 1}
    peaks = statuses[2]["metrics"]["rank_peak_memory_gb"]
    assert len(peaks) == 2 and min(peaks) > 0
    assert Path(statuses[2]["adapter_path"], "adapters.safetensors").is_file()


async def test_a_killed_rank_fails_the_run_and_leaves_no_process(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    async with Client(server_params(tmp_path / "home"), mode="legacy") as client:
        run_id, rank0, others = await started_group(client, tiny_model, tiny_data)
        assert len(others) == 1
        others[0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        status = await follow_to_end(client, run_id, [])
        assert time.monotonic() - killed_at < GROUP_GONE_S
        assert_all_gone([rank0, *others])
    assert status["state"] == "failed"
    assert (
        status["error"]["kind"] == "crashed"
        and "rank 1 of 2 was killed by signal SIGKILL" in status["error"]["message"]
    ), status["error"]


async def test_a_killed_rank_0_leaves_no_process(tmp_path: Path, tiny_model: Path, tiny_data: Path) -> None:
    async with Client(server_params(tmp_path / "home"), mode="legacy") as client:
        run_id, rank0, others = await started_group(client, tiny_model, tiny_data)
        rank0.send_signal(signal.SIGKILL)
        status = await follow_to_end(client, run_id, [])
        assert_all_gone([rank0, *others])
    assert status["state"] == "failed" and status["error"]["kind"] == "crashed"


async def test_cancel_stops_every_rank(tmp_path: Path, tiny_model: Path, tiny_data: Path) -> None:
    async with Client(server_params(tmp_path / "home"), mode="legacy") as client:
        run_id, rank0, others = await started_group(client, tiny_model, tiny_data)
        cancelled = await client.call_tool("cancel_run", {"run_id": run_id})
        assert cancelled.structured_content["state"] == "cancelled"  # type: ignore[index]
        assert_all_gone([rank0, *others])
        adapter = Path(cancelled.structured_content["run_dir"], "adapters", "adapters.safetensors")  # type: ignore[index]
        assert adapter.is_file()  # rank 0 saved what the group had learned


async def test_a_cancelled_group_resumes_from_rank_0s_checkpoint(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    run = config(tiny_model, tiny_data, 2, iters=300, steps_per_eval=1000, save_every=10)
    async with Client(server_params(tmp_path / "home"), mode="legacy") as client:
        started = await client.call_tool("start_qlora_run", {"config": run})
        run_id = started.structured_content["run_id"]  # type: ignore[index]
        with anyio.fail_after(TIMEOUT):
            while (await client.call_tool("run_status", {"run_id": run_id})).structured_content["iteration"] < 25:  # type: ignore[index]
                await anyio.sleep(0.2)
        await client.call_tool("cancel_run", {"run_id": run_id})
        resumed = await client.call_tool("resume_run", {"run_id": run_id})
        assert resumed.structured_content["from_step"] >= 25  # type: ignore[index]
        assert (await follow_to_end(client, run_id, []))["state"] == "succeeded"
        two = await train_losses(client, run_id)
        alone = await client.call_tool("start_qlora_run", {"config": {**run, "num_processes": 1}})
        alone_id = alone.structured_content["run_id"]  # type: ignore[index]
        assert (await follow_to_end(client, alone_id, []))["state"] == "succeeded"
        one = await train_losses(client, alone_id)
    assert len(one) == len(two) == 300
    assert max(abs(a - b) for a, b in zip(one[:60], two[:60], strict=True)) < 1e-4  # across the resume point


async def test_a_hung_rank_fails_the_run_after_the_timeout(tmp_path: Path, tiny_model: Path, tiny_data: Path) -> None:
    params = server_params(tmp_path / "home")
    params.env = {**(params.env or {}), "MCP_LOCAL_GROUP_TIMEOUT_S": "4"}
    async with Client(params, mode="legacy") as client:
        run_id, rank0, others = await started_group(client, tiny_model, tiny_data)
        others[0].send_signal(signal.SIGSTOP)  # alive, but never reaches the next collective
        try:
            status = await follow_to_end(client, run_id, [])
        finally:
            for p in others:
                if p.is_running():
                    p.send_signal(signal.SIGCONT)
        assert_all_gone([rank0, *others])
    assert status["state"] == "failed" and "a rank hung" in status["error"]["message"], status["error"]


async def test_a_run_over_two_machines_starts_the_other_rank_over_ssh(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH, encoding="utf-8")
    (bin_dir / "ssh").chmod(0o755)
    hostfile = tmp_path / "hosts.json"
    machines = [{"ssh": "this-mac", "ips": ["127.0.0.1"]}, {"ssh": "mac-2", "ips": ["127.0.0.1"]}]
    hostfile.write_text(json.dumps({"hosts": machines}), encoding="utf-8")
    params = server_params(tmp_path / "home")
    env = params.env or {}
    params.env = env | {"PATH": f"{bin_dir}:{env.get('PATH', '')}", "FAKE_SSH_LOG": str(tmp_path / "ssh.log")}
    async with Client(params, mode="legacy") as client:
        losses, statuses = [], []
        for run in (config(tiny_model, tiny_data, 1), config(tiny_model, tiny_data, 1, hosts=str(hostfile))):
            started = await client.call_tool("start_qlora_run", {"config": run})
            run_id = started.structured_content["run_id"]  # type: ignore[index]
            statuses.append(await follow_to_end(client, run_id, []))
            assert statuses[-1]["state"] == "succeeded", statuses[-1]
            losses.append(await train_losses(client, run_id))
    assert (tmp_path / "ssh.log").read_text() == "mac-2\n"  # rank 1 went to the second machine, rank 0 ran here
    assert len(statuses[1]["metrics"]["rank_peak_memory_gb"]) == 2
    assert max(abs(a - b) for a, b in zip(losses[0], losses[1], strict=True)) < 1e-5, losses


async def test_a_group_past_its_per_process_budget_is_stopped_whole(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    run = config(tiny_model, tiny_data, 2, iters=100_000, memory_budget_gb=0.006, allow_over_budget=True)
    async with Client(server_params(tmp_path / "home"), mode="legacy") as client:
        started = await client.call_tool("start_qlora_run", {"config": run})
        status = await follow_to_end(client, started.structured_content["run_id"], [])  # type: ignore[index]
        assert (await client.call_tool("profile_memory", {})).structured_content["workers"] == []  # type: ignore[index]
    error = status["error"]
    assert status["state"] == "failed" and error["kind"] == "memory_budget", status
    assert re.search(r"reached [0-9.]+ GB on rank [01], over the run's budget of 0.006 GB", error["message"]), error


async def test_a_batch_that_does_not_split_is_refused(tmp_path: Path, tiny_model: Path, tiny_data: Path) -> None:
    async with Client(server_params(tmp_path / "home"), mode="legacy") as client:
        refused = await client.call_tool(
            "start_qlora_run", {"config": tiny_run_config(tiny_model, tiny_data, batch_size=3, num_processes=2)}
        )
        profile = await client.call_tool(
            "profile_memory", {"config": tiny_run_config(tiny_model, tiny_data, batch_size=4, num_processes=2)}
        )
    plan = profile.structured_content["prediction"]["plan"]  # type: ignore[index]
    assert plan["batch_size"] == 2 and "per process (each of 2)" in profile.content[0].text  # type: ignore[union-attr]
    text = refused.content[0].text  # type: ignore[union-attr]
    assert refused.is_error and "batch_size 3 does not split over num_processes 2" in text, text
