"""list_models (what the machine holds, with sizes and origins) and delete_run (an ended run's record, folder and
adapter, refused while it runs)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from mcp import Client
from mcp_local import ServerSettings, build_server
from mcp_local_demo.bundled import smollm2_gguf
from tests.mcp.conftest import fake_server
from tests.trainer.helpers import config


async def _until(client: Client, run_id: str, states: set[str]) -> dict:  # type: ignore[type-arg]
    with anyio.fail_after(60):
        while True:
            status = (await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 5})).structured_content
            assert status is not None
            if status["state"] in states:
                return status


async def test_an_ended_run_is_deleted_whole_and_a_running_one_is_refused(
    tmp_path: Path, fake_model: Path, tiny_data: Path
) -> None:
    elsewhere = tmp_path / "my-adapter"  # an adapter_dir the run created outside its folder goes too
    async with Client(fake_server(tmp_path / "home", "slow"), mode="legacy") as client:
        live = await client.call_tool("start_qlora_run", {"config": config(fake_model, tiny_data, iters=200)})
        live_id = live.structured_content["run_id"]  # type: ignore[index]
        await _until(client, live_id, {"running"})
        refused = await client.call_tool("delete_run", {"run_id": live_id})
        assert refused.is_error and "cancel_run first" in refused.content[0].text  # type: ignore[union-attr]
        assert Path(live.structured_content["run_dir"]).is_dir()  # type: ignore[index]
        await client.call_tool("cancel_run", {"run_id": live_id})
        assert not (await client.call_tool("delete_run", {"run_id": live_id})).is_error

        done = await client.call_tool(
            "start_qlora_run", {"config": config(fake_model, tiny_data, iters=3, adapter_dir=str(elsewhere))}
        )
        run_id = done.structured_content["run_id"]  # type: ignore[index]
        await _until(client, run_id, {"succeeded"})
        run_dir = Path(done.structured_content["run_dir"])  # type: ignore[index]
        assert run_dir.is_dir() and (elsewhere / "adapters.safetensors").is_file()
        deleted = await client.call_tool("delete_run", {"run_id": run_id})
        assert not deleted.is_error, deleted.content
        body = deleted.structured_content
        written = [str(elsewhere / "adapters.safetensors"), str(elsewhere / "adapter_config.json")]
        assert body["removed"] == [str(run_dir), *written, str(elsewhere)] and body["freed_gb"] >= 0  # type: ignore[index]
        assert not run_dir.exists() and not elsewhere.exists()
        assert not list(run_dir.parent.iterdir())  # nothing set aside is left
        assert (await client.call_tool("list_runs", {})).structured_content["runs"] == []  # type: ignore[index]
        gone = await client.call_tool("run_status", {"run_id": run_id})
        assert gone.is_error and "no run" in gone.content[0].text  # type: ignore[union-attr]


@pytest.mark.slow  # a real GGUF import
async def test_models_are_listed_with_their_origin_and_imports_live_under_the_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    gguf = smollm2_gguf()
    async with Client(build_server(ServerSettings(home=home, roots=(gguf.parent,))), mode="legacy") as client:
        empty = (await client.call_tool("list_models", {})).structured_content
        assert empty["loaded"] == [] and empty["imported"] == []  # type: ignore[index]
        loaded = await client.call_tool("load_model", {"path": str(gguf)})
        assert not loaded.is_error, loaded.content
        listing = await client.call_tool("list_models", {})
    body = listing.structured_content
    assert [m["model"] for m in body["loaded"]] and len(body["imported"]) == 1  # type: ignore[index]
    imported = body["imported"][0]  # type: ignore[index]
    assert imported["source"] == str(gguf) and Path(imported["path"]).parent == home / "models"
    assert 0.05 < imported["size_gb"] < 1.0  # the 135M model at 4 bits
    assert isinstance(body["hub_cache"], list)  # type: ignore[index]
    assert "1 loaded, 1 imported" in listing.content[0].text  # type: ignore[union-attr]
