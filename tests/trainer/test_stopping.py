"""Stopping a run keeps its work: one stop however many ask, a wait as long as the step in flight, and a frozen
worker killed even when the caller stopped waiting (real worker subprocesses, the fake backend's stepwise mode)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio

from tests.trainer.helpers import config, fake_env, process_gone
from trainer import JobRunner, JobState, RunStore

START_TIMEOUT = 30


def stepwise_runner(home: Path, step_s: float, save_s: float = 0.0, grace_s: float = 1.0) -> JobRunner:
    env = {**fake_env("stepwise"), "FAKE_STEP_S": str(step_s), "FAKE_SAVE_S": str(save_s)}
    return JobRunner(RunStore(home), worker_env=env, cancel_grace_s=grace_s)


#: a budget the fake backends' 40 MB of MLX memory passes, the run started all the same
OVER_BUDGET = {"memory_budget_gb": 0.02, "allow_over_budget": True}


async def _wait_iteration(runner: JobRunner, run_id: str, iteration: int) -> None:
    with anyio.fail_after(START_TIMEOUT):
        while runner.get(run_id).iteration < iteration:
            await runner.wait_for_change(run_id, 1)


async def test_a_step_longer_than_the_grace_is_waited_for_and_its_state_saved(
    tmp_path: Path, fake_model: Path, tiny_data: Path
) -> None:
    async with stepwise_runner(tmp_path, step_s=4.0, grace_s=1.0) as runner:
        run = await runner.submit(config(fake_model, tiny_data, iters=100))
        await _wait_iteration(runner, run.id, 1)
        await anyio.sleep(1.0)  # a second into a 4 s step, nothing measured yet
        pid = runner.live_workers()[run.id]
        started = time.monotonic()
        with anyio.fail_after(30):
            done = await runner.cancel(run.id)
        waited = time.monotonic() - started
    assert done.state is JobState.CANCELLED and process_gone(pid)
    assert waited > 2.0  # it waited for the step, past the 1 s grace
    adapter = Path(done.run_dir, "adapters", "adapters.safetensors")
    assert adapter.read_bytes() == b"step 1"  # the last completed step's state


async def test_a_measured_long_step_is_waited_for_too(tmp_path: Path, fake_model: Path, tiny_data: Path) -> None:
    async with stepwise_runner(tmp_path, step_s=2.5, grace_s=0.5) as runner:
        run = await runner.submit(config(fake_model, tiny_data, iters=100))
        await _wait_iteration(runner, run.id, 2)  # step 1 measured: 2.5 s
        await anyio.sleep(0.5)
        with anyio.fail_after(30):
            done = await runner.cancel(run.id)
    assert done.state is JobState.CANCELLED
    assert Path(done.run_dir, "adapters", "adapters.safetensors").read_bytes() == b"step 2"


async def test_twenty_cancels_at_once_join_one_stop_and_the_save_survives(
    tmp_path: Path, fake_model: Path, tiny_data: Path
) -> None:
    async with stepwise_runner(tmp_path, step_s=0.2, save_s=2.0, grace_s=10.0) as runner:
        run = await runner.submit(config(fake_model, tiny_data, iters=1000))
        await _wait_iteration(runner, run.id, 3)
        states: list[JobState] = []

        async def cancel() -> None:
            states.append((await runner.cancel(run.id)).state)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(cancel)
                    await anyio.sleep(0.05)  # spread over the save: each later SIGTERM would land in it
        done = runner.get(run.id)
    assert states == [JobState.CANCELLED] * 20 and done.state is JobState.CANCELLED
    assert Path(done.run_dir, "adapters", "adapters.safetensors").read_bytes().startswith(b"step ")
    events = Path(done.run_dir, "events.jsonl").read_text()
    assert events.count('"type":"stopping"') == 1 and '"type":"stopped"' in events


async def test_a_frozen_worker_is_killed_though_the_cancel_request_gave_up(
    tmp_path: Path, fake_model: Path, tiny_data: Path
) -> None:
    async with stepwise_runner(tmp_path, step_s=0.2, grace_s=1.0) as runner:
        run = await runner.submit(config(fake_model, tiny_data, iters=1000))
        await _wait_iteration(runner, run.id, 2)
        pid = runner.live_workers()[run.id]
        os.kill(pid, signal.SIGSTOP)
        with anyio.move_on_after(0.3):  # the client cancels its cancel_run request
            await runner.cancel(run.id)
        with anyio.fail_after(20):
            done = await runner.wait_until_done(run.id, 20)
    assert done.state is JobState.CANCELLED and process_gone(pid)


async def test_a_budget_passed_in_the_steps_stops_the_run_though_a_library_took_the_signals(
    tmp_path: Path, fake_model: Path, tiny_data: Path
) -> None:
    """The watchdog's stop does not depend on the OS delivering a signal to Python's handler: on CUDA a library took
    it, and a run passed its budget at step 7 yet trained to step 30 (docs/benchmarks.md). Cancel works there too."""
    env = {**fake_env("peak_in_steps"), "FAKE_STEP_S": "0.05"}
    async with JobRunner(RunStore(tmp_path), worker_env=env) as runner:
        over = await runner.submit(config(fake_model, tiny_data, iters=400, **OVER_BUDGET, memory_sample_interval=0.05))
        done = await runner.wait_until_done(over.id, 60)
        assert done.state is JobState.FAILED and done.error is not None, done
        assert done.error.kind == "memory_budget" and "every step was done" not in done.error.message, done.error
        assert done.iteration < 100, done.iteration
        cancelled = await runner.submit(config(fake_model, tiny_data, iters=400))
        await _wait_iteration(runner, cancelled.id, 3)
        stopped = await runner.cancel(cancelled.id)
    assert stopped.state is JobState.CANCELLED and stopped.iteration < 400, stopped
    assert '"type":"stopped"' in Path(stopped.run_dir, "events.jsonl").read_text()  # its own stop, not a kill


async def test_a_budget_passed_during_the_final_save_fails_the_run_with_its_adapter(
    tmp_path: Path, fake_model: Path, tiny_data: Path
) -> None:
    """A stop is dropped while the last adapter is written; a peak over the budget seen then still fails the run,
    whichever moment the sampler saw it (the adapter complete, and said so)."""
    env = {**fake_env("peak_in_save"), "FAKE_STEP_S": "0.01"}
    async with JobRunner(RunStore(tmp_path), worker_env=env) as runner:
        run = await runner.submit(config(fake_model, tiny_data, iters=3, **OVER_BUDGET, memory_sample_interval=0.1))
        done = await runner.wait_until_done(run.id, 60)
    assert done.state is JobState.FAILED and done.error is not None, done
    assert done.error.kind == "memory_budget" and "every step was done" in done.error.message
    assert done.error.message.startswith("over budget: MLX peak memory reached")  # nothing was stopped
    assert Path(done.run_dir, "adapters", "adapters.safetensors").read_bytes() == b"step 3"
