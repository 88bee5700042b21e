"""A home whose disk fills up while a run trains (a real ENOSPC: a small tmpfs in a private mount namespace): named
errors, a server that stays up, a database that stays whole, and a run that resumes once there is space again."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp import Client, StdioServerParameters
from tests.conftest import user_namespaces
from tests.trainer.helpers import config, fake_env

pytestmark = pytest.mark.slow
TIMEOUT = 60


def _available() -> bool:
    return (
        shutil.which("unshare") is not None and subprocess.run(["unshare", "-Urm", "true"], check=False).returncode == 0
    )


async def _status(client: Client, run_id: str, wait: float = 0) -> dict[str, Any]:
    result = await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": wait, "memory_samples": 0})
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb") as f, pytest.raises(OSError, match="No space left"):
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
    return filler


@pytest.mark.skipif(
    not user_namespaces(), reason="user namespaces are not available, so no small filesystem can be mounted"
)
async def test_a_full_disk_fails_the_run_by_name_and_the_server_and_database_survive(
    tmp_path: Path, fake_model: Path, tiny_data: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    serve = 'mount -t tmpfs -o size=16m tmpfs "$0" && exec "$1" -m mcp_local --home "$0" --root "$2" --log-level ERROR'
    params = StdioServerParameters(
        command="unshare",
        args=["-Urm", "sh", "-c", serve, str(home), sys.executable, tempfile.gettempdir()],
        env={"PATH": os.environ.get("PATH", ""), **fake_env("slow"), "FAKE_STEP_S": "0.05"},
    )
    with anyio.fail_after(TIMEOUT * 3):
        async with Client(params, mode="legacy") as client:
            server = (await client.call_tool("profile_memory", {})).structured_content["server"]  # type: ignore[index]
            inside = Path(f"/proc/{server['pid']}/root") / str(home).lstrip("/")  # the server's view of its home
            started = await client.call_tool("start_qlora_run", {"config": config(fake_model, tiny_data, iters=200)})
            run_id = started.structured_content["run_id"]  # type: ignore[index]
            status = await _status(client, run_id)
            while status["iteration"] < 5:
                status = await _status(client, run_id, wait=2)

            filler = _fill(inside)
            refused = await client.call_tool("start_qlora_run", {"config": config(fake_model, tiny_data)})
            text = refused.content[0].text  # type: ignore[union-attr]
            assert refused.is_error and "No space left on device" in text and "run folder" in text, text
            while status["state"] == "running":
                status = await _status(client, run_id, wait=2)
            assert status["state"] == "failed" and status["error"]["kind"] == "storage", status["error"]
            assert "was full" in status["error"]["message"] and "resume_run" in status["error"]["message"]
            assert (await client.call_tool("list_runs", {})).structured_content is not None  # still answering

            filler.unlink()
            with anyio.fail_after(TIMEOUT):
                while (resumed := await client.call_tool("resume_run", {"run_id": run_id})).is_error:
                    await anyio.sleep(0.5)  # the run's end is recorded once the database takes writes again
            assert resumed.structured_content["attempt"] == 2  # type: ignore[index]
            while status["state"] != "succeeded" or status["attempt"] != 2:
                status = await _status(client, run_id, wait=2)
                assert status["state"] != "failed", status["error"]
            with sqlite3.connect(inside / "runs.sqlite3") as db:
                assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
