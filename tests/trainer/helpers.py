from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import REPO
from tests.trainer.fake_backend import SPEC
from trainer import JobRunner, RunStore
from trainer.lifecycle.backend import BackendEvent, Cancelled, request_stop
from trainer.lifecycle.events import TrainReport
from trainer.planning.config import QLoRAConfig


def fake_env(mode: str) -> dict[str, str]:
    return {"TRAINER_BACKEND": SPEC, "FAKE_MODE": mode, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}


@asynccontextmanager
async def fake_runner(home: Path, mode: str, **kwargs: Any) -> AsyncIterator[JobRunner]:
    async with JobRunner(RunStore(home), worker_env=fake_env(mode), **kwargs) as runner:
        yield runner


def process_gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def config(model: Path, data: Path, /, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": str(model), "data": str(data), "num_layers": 4, "iters": 5, "batch_size": 2}
    return {**base, **overrides}


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its SHA-256: what a user's folder held, to compare after."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class Recorder:
    """The events of one attempt; asks for a stop (as SIGTERM does) once step `stop_after` has been reported."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.events: list[BackendEvent] = []

    def __call__(self, event: BackendEvent) -> None:
        self.events.append(event)
        if isinstance(event, TrainReport) and event.iteration == self.stop_after:
            request_stop(Cancelled)

    def losses(self) -> dict[int, float]:
        return {e.iteration: e.train_loss for e in self.events if isinstance(e, TrainReport)}


def train_in_process(config: QLoRAConfig, run_dir: Path, stop_after: int | None = None) -> Recorder:
    """Train in this process with the real backend, stopping after `stop_after` if given."""
    from trainer.engine.mlx_backend import MlxTrainingBackend  # MLX only in the tests that train

    recorder = Recorder(stop_after)
    try:
        MlxTrainingBackend().train(config, run_dir, recorder)
    except Cancelled:
        assert stop_after is not None
    return recorder


@dataclass
class KilledAndCancelled:
    """A run whole; the same run killed (SIGKILL) at a step and resumed; a third cancelled at a step."""

    whole: Any
    resumed: Any
    stopped: Any
    killed_pid: int
    losses: dict[str, list[float]]  # each step's train loss, of the whole and the resumed run


async def kill_resume_and_cancel(
    home: Path, settings: dict[str, Any], kill_at: int, cancel_at: int
) -> KilledAndCancelled:
    import os
    import signal

    import anyio

    async with JobRunner(RunStore(home)) as runner:
        whole = await runner.wait_until_done((await runner.submit(settings)).id, 300)
        killed = await runner.submit(settings)
        with anyio.fail_after(120):
            while runner.get(killed.id).iteration < kill_at:
                await runner.wait_for_change(killed.id, 1)
        pid = runner.live_workers()[killed.id]
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(60):
            while not runner.get(killed.id).state.terminal:
                await runner.wait_for_change(killed.id, 1)
        await runner.resume(killed.id)
        resumed = await runner.wait_until_done(killed.id, 300)
        cancelled = await runner.submit(settings)
        with anyio.fail_after(120):
            while runner.get(cancelled.id).iteration < cancel_at:
                await runner.wait_for_change(cancelled.id, 1)
        stopped = await runner.cancel(cancelled.id)
        losses = {run: [r.train_loss for r in runner.reports(run)[0]] for run in (whole.id, killed.id)}
    return KilledAndCancelled(whole, resumed, stopped, pid, {"whole": losses[whole.id], "resumed": losses[killed.id]})
