"""Nothing a user owns is lost, tried over MCP stdio against the real server and real worker subprocesses: delete_run
removes only the files a run wrote, an adapter_dir that would mix with the user's own folders is refused, and twenty
concurrent cancels keep the save."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp import Client, StdioServerParameters
from tests.trainer.helpers import config, fake_env

pytestmark = pytest.mark.slow
TIMEOUT = 60


def fake_stdio(home: Path, mode: str, **env: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_local", "--home", str(home), "--root", tempfile.gettempdir()],
        env={"PATH": os.environ.get("PATH", ""), **fake_env(mode), **env},
    )


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


async def until_ended(client: Client, run_id: str) -> dict[str, Any]:
    with anyio.fail_after(TIMEOUT):
        while True:
            status = (await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 5})).structured_content
            assert status is not None
            if status["state"] in ("succeeded", "failed", "cancelled"):
                return status


async def start(client: Client, cfg: dict[str, Any]) -> str:
    started = await client.call_tool("start_qlora_run", {"config": cfg})
    assert not started.is_error, started.content
    return str(started.structured_content["run_id"])  # type: ignore[index]


async def test_delete_run_leaves_every_byte_it_did_not_write(tmp_path: Path, fake_model: Path, tiny_data: Path) -> None:
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's notes")
    created = tmp_path / "new" / "adapter"
    before = {p: tree_hashes(p) for p in (fake_model, tiny_data)}
    async with Client(fake_stdio(tmp_path / "home", "succeed"), mode="legacy") as client:
        shared = await start(client, config(fake_model, tiny_data, iters=3, adapter_dir=str(mine)))
        fresh = await start(client, config(fake_model, tiny_data, iters=3, adapter_dir=str(created)))
        changed = await start(client, config(fake_model, tiny_data, iters=3, adapter_dir=str(tmp_path / "edited")))
        for run_id in (shared, fresh, changed):
            assert (await until_ended(client, run_id))["state"] == "succeeded"
        (tmp_path / "edited" / "adapter_config.json").write_text('{"edited": "by the user"}')

        deleted = await client.call_tool("delete_run", {"run_id": shared})
        assert not deleted.is_error, deleted.content
        assert (mine / "notes.txt").read_text() == "a user's notes"  # the folder was the user's: it stays
        assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
        removed = deleted.structured_content["removed"]  # type: ignore[index]
        assert str(mine / "adapters.safetensors") in removed and str(mine) not in removed

        deleted = await client.call_tool("delete_run", {"run_id": fresh})
        assert not deleted.is_error and not created.exists() and not created.parent.exists()  # the run made both

        deleted = await client.call_tool("delete_run", {"run_id": changed})
        assert not deleted.is_error
        assert sorted(p.name for p in (tmp_path / "edited").iterdir()) == ["adapter_config.json"]
        kept = deleted.structured_content["kept"]  # type: ignore[index]
        assert any("changed since the run wrote it" in k for k in kept), kept
    assert {p: tree_hashes(p) for p in (fake_model, tiny_data)} == before


async def test_an_adapter_dir_over_the_users_folders_is_refused_before_anything_is_written(
    tmp_path: Path, fake_model: Path, tiny_data: Path
) -> None:
    home = tmp_path / "home"
    async with Client(fake_stdio(home, "succeed"), mode="legacy") as client:
        for folder, what in [
            (home, "the server's home"),
            (tiny_data, "the dataset's folder"),
            (fake_model, "the model's folder"),
            (tmp_path, "the server's home"),  # above the home, the model and the data
        ]:
            refused = await client.call_tool(
                "start_qlora_run", {"config": config(fake_model, tiny_data, adapter_dir=str(folder))}
            )
            assert refused.is_error, folder
            text = refused.content[0].text  # type: ignore[union-attr]
            assert str(folder) in text and what in text and "pick a new or empty folder" in text
        assert (await client.call_tool("list_runs", {})).structured_content["runs"] == []  # type: ignore[index]


async def test_twenty_concurrent_cancel_run_calls_keep_the_save(
    tmp_path: Path, fake_model: Path, tiny_data: Path
) -> None:
    server = fake_stdio(tmp_path / "home", "stepwise", FAKE_STEP_S="0.2", FAKE_SAVE_S="2")
    async with Client(server, mode="legacy") as client:
        run_id = await start(client, config(fake_model, tiny_data, iters=1000))
        with anyio.fail_after(TIMEOUT):
            while (await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 2})).structured_content[
                "iteration"  # type: ignore[index]
            ] < 3:
                pass
        answers: list[Any] = []

        async def cancel() -> None:
            answers.append(await client.call_tool("cancel_run", {"run_id": run_id}))

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(cancel)
                    await anyio.sleep(0.05)
        status = await until_ended(client, run_id)
    assert status["state"] == "cancelled"
    assert all(not a.is_error and a.structured_content["state"] == "cancelled" for a in answers)
    assert Path(status["adapter_path"], "adapters.safetensors").read_bytes().startswith(b"step ")
