"""A bounded chaos test: 100 random actions (start, cancel alone and several at once, delete, resume, generate, the
server SIGKILLed and started again) over MCP stdio on the tiny model, real MLX training in real workers. After each
action: no byte outside the runs' own folders changed, every ended run has its adapter or a named reason (or trained
nothing that could be lost); at the end no worker process is left."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from mcp import Client, StdioServerParameters
from tests.conftest import REPO, tiny_run_config
from tests.trainer.helpers import tree_hashes

pytestmark = pytest.mark.slow
ACTIONS = 100
SEED = 26
ENDED = ("succeeded", "failed", "cancelled")


class Chaos:
    def __init__(self, tmp: Path, model: Path, data: Path) -> None:
        self.home, self.model, self.data = tmp / "home", model, data
        self.outputs = tmp / "outputs"  # adapter_dirs the runs create (removed with them)
        self.user = tmp / "user-files"  # a user's folder that runs write into beside their files
        self.user.mkdir()
        (self.user / "notes.txt").write_text("mine")
        self.fixtures = {p: tree_hashes(p) for p in (model, data)}
        self.fixtures[self.user] = tree_hashes(self.user)
        self.random = random.Random(SEED)
        self.runs: dict[str, dict[str, Any]] = {}  # the last status seen of each run not deleted
        self.log: list[str] = []
        self.loaded = False

    def params(self) -> StdioServerParameters:
        return StdioServerParameters(
            command=sys.executable,
            args=["-m", "mcp_local", "--home", str(self.home), "--root", tempfile.gettempdir(), "--log-level", "ERROR"],
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO / "src")},
        )

    async def refresh(self, client: Client) -> None:
        for run_id in list(self.runs):
            result = await client.call_tool("run_status", {"run_id": run_id, "memory_samples": 0})
            assert not result.is_error, result.content
            self.runs[run_id] = result.structured_content or {}

    def check(self) -> None:
        for folder, hashes in self.fixtures.items():
            written = {name for name in tree_hashes(folder) if name not in hashes}
            assert {k: v for k, v in tree_hashes(folder).items() if k in hashes} == hashes, (folder, self.log[-5:])
            assert written <= {"adapters.safetensors", "adapter_config.json"}, (folder, written)
        for run_id, status in self.runs.items():
            if status.get("state") not in ENDED:
                continue
            adapter = status.get("adapter_path")
            saved = adapter is not None and Path(adapter, "adapters.safetensors").is_file()
            if status["state"] == "succeeded":
                assert saved, (run_id, status, self.log[-5:])
            elif status["state"] == "failed":
                assert status["error"]["kind"] and status["error"]["message"], (run_id, status)
            else:  # cancelled: what it learned is saved, or it learned nothing
                assert saved or status["iteration"] == 0, (run_id, status, self.log[-5:])

    def pick(self, states: tuple[str, ...]) -> str | None:
        ids = [r for r, s in self.runs.items() if s.get("state") in states]
        return self.random.choice(ids) if ids else None

    async def act(self, client: Client) -> bool:
        """One random action; False when it killed the server."""
        roll = self.random.random()
        if roll < 0.25:
            adapter_dir: dict[str, str] = {}
            where = self.random.random()
            if where < 0.2:
                adapter_dir = {"adapter_dir": str(self.outputs / f"a{len(self.log)}")}
            elif where < 0.3 and not (self.user / "adapters.safetensors").exists():
                adapter_dir = {"adapter_dir": str(self.user)}
            cfg = tiny_run_config(
                self.model, self.data, iters=self.random.randint(10, 60), save_every=10, steps_per_eval=1000,
                **adapter_dir,
            )  # fmt: skip
            result = await client.call_tool("start_qlora_run", {"config": cfg})
            if not result.is_error:
                self.runs[result.structured_content["run_id"]] = {"state": "queued"}  # type: ignore[index]
            self.log.append(f"start {adapter_dir} -> {result.is_error}")
        elif roll < 0.45:
            run_id = self.pick(("queued", "running"))
            if run_id is not None:
                times = self.random.choice([1, 1, 3, 5])
                async with anyio.create_task_group() as tg:
                    for _ in range(times):
                        tg.start_soon(client.call_tool, "cancel_run", {"run_id": run_id})
                self.log.append(f"cancel x{times} {run_id}")
        elif roll < 0.58:
            run_id = self.pick(ENDED)
            if run_id is not None:
                result = await client.call_tool("delete_run", {"run_id": run_id})
                assert not result.is_error, result.content
                del self.runs[run_id]
                self.log.append(f"delete {run_id}")
        elif roll < 0.68:
            run_id = self.pick(("failed", "cancelled"))
            if run_id is not None:
                result = await client.call_tool("resume_run", {"run_id": run_id})
                self.log.append(f"resume {run_id} -> {result.is_error}")
        elif roll < 0.83:
            if not self.loaded:
                assert not (await client.call_tool("load_model", {"path": str(self.model)})).is_error
                self.loaded = True
            done = self.pick(("succeeded",))
            arguments: dict[str, Any] = {"prompt": "def add", "max_tokens": 4}
            if done is not None and self.random.random() < 0.5:
                arguments["run_id"] = done
            result = await client.call_tool("generate", arguments)
            assert not result.is_error or "no adapter" in result.content[0].text, result.content  # type: ignore[union-attr]
            self.log.append(f"generate {arguments.get('run_id')}")
        elif roll < 0.88:
            server = (await client.call_tool("profile_memory", {})).structured_content["server"]["pid"]  # type: ignore[index]
            os.kill(server, signal.SIGKILL)
            self.log.append("kill the server")
            return False
        else:
            await anyio.sleep(self.random.uniform(0.2, 2.0))
            self.log.append("wait")
        return True


async def test_a_hundred_random_actions_lose_nothing(tmp_path: Path, tiny_model: Path, tiny_data: Path) -> None:
    model, data = tmp_path / "model", tmp_path / "data"
    shutil.copytree(tiny_model, model)
    shutil.copytree(tiny_data, data)
    chaos = Chaos(tmp_path, model, data)
    done = 0
    with anyio.fail_after(300):
        while done < ACTIONS:
            chaos.loaded = killed = False
            try:
                async with Client(chaos.params(), mode="legacy") as client:
                    while done < ACTIONS:
                        await chaos.refresh(client)
                        chaos.check()
                        done += 1
                        if not await chaos.act(client):
                            killed = True
                            break
                    else:
                        await chaos.refresh(client)
                        chaos.check()
                        await finish(chaos, client)
            except Exception:
                if not killed:  # only a SIGKILLed server's broken pipes are expected here
                    raise
    workers = [
        p for p in psutil.process_iter(["cmdline"]) if "trainer.lifecycle.worker" in " ".join(p.info["cmdline"] or [])
    ]
    assert not [p for p in workers if str(chaos.home) in " ".join(p.info["cmdline"] or [])], "a worker is left"
    assert done == ACTIONS, chaos.log
    kinds = [entry.split()[0] for entry in chaos.log]
    counts = {kind: kinds.count(kind) for kind in ("start", "cancel", "delete", "resume", "generate", "kill")}
    assert min(counts.values()) >= 2, counts  # every kind happened, more than once (seed 26: 26 starts, 5 kills)


async def finish(chaos: Chaos, client: Client) -> None:
    """Stop what still runs, and check every run's ending."""
    for run_id, status in list(chaos.runs.items()):
        if status.get("state") in ("queued", "running"):
            await client.call_tool("cancel_run", {"run_id": run_id})
    await chaos.refresh(client)
    assert all(s.get("state") in ENDED for s in chaos.runs.values()), chaos.runs
    chaos.check()
