"""The server as a real subprocess over stdio, driven by the SDK's client in both protocol eras, training for real."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from mcp.client.subscriptions import ResourceUpdated
from mcp.types import ResourceListChangedNotification, ResourceUpdatedNotification

from mcp import Client, StdioServerParameters
from tests.conftest import REPO, tiny_run_config
from tests.mcp.test_tools_in_memory import TOOLS

pytestmark = pytest.mark.slow
TMP = tempfile.gettempdir()  # pytest's folders, where the tests' models and data are: an allowed root
SAMPLE_INTERVAL = 0.2
PROMPT = "Write add_gamma adding 7."
TIMEOUT = 180


def server_params(home: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_local", "--home", str(home), "--sample-interval", str(SAMPLE_INTERVAL), "--root", TMP],
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO / "src")},
    )


def run_config(model: Path, data: Path, iters: int) -> dict[str, Any]:
    return tiny_run_config(model, data, iters=iters)


async def follow_to_end(
    client: Client, run_id: str, progress: list[list[tuple[float, float | None]]]
) -> dict[str, Any]:
    """Long-poll run_status to the end; `progress` gets each call's progress notifications."""
    with anyio.fail_after(TIMEOUT):
        while True:
            this_call: list[tuple[float, float | None]] = []
            progress.append(this_call)

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                this_call.append((progress, total))  # noqa: B023  (each call gets its own list)

            result = await client.call_tool(
                "run_status", {"run_id": run_id, "wait_seconds": 10}, progress_callback=on_progress
            )
            status = result.structured_content
            assert status is not None
            if status["state"] in ("succeeded", "failed", "cancelled"):
                return status


async def cancel_a_running_run(client: Client, model: Path, data: Path) -> None:
    started = await client.call_tool("start_qlora_run", {"config": run_config(model, data, 100_000)})
    run_id = started.structured_content["run_id"]
    with anyio.fail_after(TIMEOUT):
        while True:
            status = (await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 5})).structured_content
            if status and status["iteration"] > 0:
                break
    workers = (await client.call_tool("profile_memory", {})).structured_content["workers"]
    assert [w["run_id"] for w in workers] == [run_id] and workers[0]["rss_gb"] > 0
    pid = workers[0]["pid"]
    cancelled = await client.call_tool("cancel_run", {"run_id": run_id})
    assert cancelled.structured_content["state"] == "cancelled"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    adapter = Path(cancelled.structured_content["run_dir"], "adapters", "adapters.safetensors")
    assert adapter.is_file()  # the worker saved what it had learned before it stopped
    assert cancelled.structured_content["adapter_path"] == str(adapter.parent)  # and the run says where


async def load_and_generate(client: Client, model: Path) -> str:
    loaded = await client.call_tool("load_model", {"path": str(model)})
    assert not loaded.is_error and loaded.structured_content["architecture"] == "qwen2"
    base = await client.call_tool("generate", {"prompt": PROMPT, "max_tokens": 24})
    assert not base.is_error
    return str(base.structured_content["text"])


def check_memory_resource(body: dict[str, Any]) -> None:
    samples = body["samples"]
    # a sample about every interval from the start (a fast machine trains the tiny run in well under a second)
    assert body["interval_s"] == SAMPLE_INTERVAL and len(samples) >= max(3, 0.8 * samples[-1]["t"] / SAMPLE_INTERVAL)
    assert samples[0]["t"] == 0 and not {"v", "seq", "ts", "type"} & set(samples[0])  # documented fields only
    gaps = sorted(b["t"] - a["t"] for a, b in zip(samples, samples[1:], strict=False))
    assert gaps[len(gaps) // 2] == pytest.approx(SAMPLE_INTERVAL, abs=0.1)


async def test_legacy_client_drives_the_whole_loop(tmp_path: Path, tiny_model: Path, tiny_data: Path) -> None:
    updates: list[str] = []
    list_changed = anyio.Event()

    async def on_message(message: object) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            updates.append(str(message.params.uri))
        elif isinstance(message, ResourceListChangedNotification):
            list_changed.set()

    progress: list[list[tuple[float, float | None]]] = []
    async with Client(server_params(tmp_path), mode="legacy", message_handler=on_message) as client:
        assert client.protocol_version.startswith("2025")
        assert client.server_capabilities.resources and client.server_capabilities.resources.subscribe
        assert len((await client.list_tools()).tools) == len(TOOLS)
        base_text = await load_and_generate(client, tiny_model)

        started = await client.call_tool("start_qlora_run", {"config": run_config(tiny_model, tiny_data, 40)})
        run_id = started.structured_content["run_id"]
        memory_uri = f"runs://{run_id}/memory"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # subscribe_resource is deprecated in the 2026 era
            await client.subscribe_resource(memory_uri)
        status = await follow_to_end(client, run_id, progress)
        assert status["state"] == "succeeded", status["error"]
        assert status["metrics"]["last_val_loss"] < 0.5 * status["metrics"]["first_val_loss"]
        with anyio.fail_after(5):
            await list_changed.wait()
        assert memory_uri in updates
        times = [u for u in updates if u == memory_uri]
        assert len(times) >= 2
        notified = [call for call in progress if call]
        assert sum(len(call) for call in notified) >= 2  # hosts that ignore resources still see progress
        for call in notified:
            values = [value for value, _ in call]
            assert values == sorted(set(values)) and all(total == 40 for _, total in call)

        memory = await client.read_resource(memory_uri)
        check_memory_resource(json.loads(memory.contents[0].text))

        tuned = await client.call_tool("generate", {"prompt": PROMPT, "max_tokens": 24, "run_id": run_id})
        assert not tuned.is_error and tuned.structured_content["text"] != base_text
        assert tuned.structured_content["text"].startswith("def add_")

        await cancel_a_running_run(client, tiny_model, tiny_data)


async def test_modern_client_listens_for_updates_while_a_run_trains(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    async with Client(server_params(tmp_path), mode="auto") as client:
        assert client.protocol_version == "2026-07-28"
        base_text = await load_and_generate(client, tiny_model)
        packed = {**run_config(tiny_model, tiny_data, 40), "packing": True}  # records end to end in rows
        started = await client.call_tool("start_qlora_run", {"config": packed})
        run_id = started.structured_content["run_id"]
        status_uri = f"runs://{run_id}/status"
        async with client.listen(resource_subscriptions=[status_uri]) as subscription:
            seen: list[Any] = []
            with anyio.fail_after(TIMEOUT):
                async for event in subscription:
                    seen.append(event)
                    if len(seen) >= 3:
                        break
        assert all(event == ResourceUpdated(uri=status_uri) for event in seen)
        status = await follow_to_end(client, run_id, [])
        assert status["state"] == "succeeded", status["error"]
        assert status["metrics"]["last_val_loss"] < 0.5 * status["metrics"]["first_val_loss"]
        record = await client.call_tool("run_status", {"run_id": run_id, "include_config": True})
        assert record.structured_content["config"]["packing"] is True
        assert " rows of 128 tokens, " in status["metrics"]["packing"] and status["metrics"]["packing"].endswith("full")
        memory = await client.read_resource(f"runs://{run_id}/memory")
        check_memory_resource(json.loads(memory.contents[0].text))
        tuned = await client.call_tool("generate", {"prompt": PROMPT, "max_tokens": 24, "run_id": run_id})
        assert tuned.structured_content["text"] != base_text
        await cancel_a_running_run(client, tiny_model, tiny_data)
