"""The runner against real worker subprocesses running the fake backend: every ending, every process gone."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import pytest

from tests.trainer.helpers import config, fake_runner, process_gone
from trainer import ConfigError, FailureKind, JobState, RunConflict, RunStore

START_TIMEOUT = 30  # a cold interpreter start on a loaded 2-core machine


async def _wait_running(runner, run_id: str) -> None:  # type: ignore[no-untyped-def]
    with anyio.fail_after(START_TIMEOUT):
        while not (snap := runner.get(run_id)).iteration:
            await runner.wait_for_change(run_id, 1)
    assert snap.state is JobState.RUNNING


async def test_successful_run_is_recorded_with_its_metrics_and_adapter(tmp_path: Path, fake_model, tiny_data) -> None:
    async with fake_runner(tmp_path, "succeed") as runner:
        run = await runner.submit(config(fake_model, tiny_data, memory_sample_interval=0.05))
        done = await runner.wait_until_done(run.id, START_TIMEOUT)
        samples = runner.memory_samples(run.id)
        assert samples and runner.memory_samples(run.id, 0) == [] and runner.memory_samples(run.id, 1) == samples[-1:]
    assert done.state is JobState.SUCCEEDED and done.phase is None
    assert done.iteration == 5 and done.metrics.last_train_loss == pytest.approx(0.2)
    assert done.metrics.last_val_loss == 0.5
    assert Path(done.adapter_path or "", "adapters.safetensors").read_bytes() == b"fake"
    stored = RunStore(tmp_path).get(run.id)  # a fresh connection sees the committed record
    assert stored.state is JobState.SUCCEEDED and stored.ended_at and stored.error is None
    events = (Path(done.run_dir) / "events.jsonl").read_text().splitlines()
    assert '"type":"started"' in events[0] and '"type":"finished"' in events[-1]


async def test_reported_failure_keeps_the_workers_kind_and_message(tmp_path: Path, fake_model, tiny_data) -> None:
    async with fake_runner(tmp_path, "fail") as runner:
        run = await runner.submit(config(fake_model, tiny_data))
        done = await runner.wait_until_done(run.id, START_TIMEOUT)
    assert done.state is JobState.FAILED
    assert done.error is not None and done.error.kind is FailureKind.BACKEND and done.error.exit_code == 1
    assert "failed on purpose" in done.error.message
    assert "Traceback" in (done.error.stderr_tail or "")
    assert RunStore(tmp_path).get(run.id).error == done.error


async def test_a_diverged_run_fails_with_its_own_kind(tmp_path: Path, fake_model, tiny_data) -> None:
    async with fake_runner(tmp_path, "diverge") as runner:
        run = await runner.submit(config(fake_model, tiny_data))
        done = await runner.wait_until_done(run.id, START_TIMEOUT)
    assert done.state is JobState.FAILED and done.error is not None
    assert done.error.kind is FailureKind.DIVERGED and "lower learning_rate" in done.error.message


@pytest.mark.parametrize(("mode", "signal_name"), [("crash", "SIGKILL"), ("segfault", "SIGSEGV")])
async def test_worker_killed_by_signal_marks_run_failed_crashed(
    tmp_path: Path, fake_model, tiny_data, mode: str, signal_name: str
) -> None:
    async with fake_runner(tmp_path, mode) as runner:
        run = await runner.submit(config(fake_model, tiny_data))
        done = await runner.wait_until_done(run.id, START_TIMEOUT)
    assert done.state is JobState.FAILED and done.error is not None
    assert done.error.kind is FailureKind.CRASHED and done.error.exit_code is not None and done.error.exit_code < 0
    assert signal_name in done.error.message
    assert RunStore(tmp_path).get(run.id).state is JobState.FAILED


async def test_hung_worker_is_cancelled_and_its_process_is_gone(tmp_path: Path, fake_model, tiny_data) -> None:
    async with fake_runner(tmp_path, "hang") as runner:
        run = await runner.submit(config(fake_model, tiny_data))
        await _wait_running(runner, run.id)
        pid = runner.live_workers()[run.id]
        with anyio.fail_after(10):
            done = await runner.cancel(run.id)
        assert done.state is JobState.CANCELLED and process_gone(pid)
        assert runner.live_workers() == {}
        with pytest.raises(RunConflict, match="already ended"):
            await runner.cancel(run.id)
    assert RunStore(tmp_path).get(run.id).state is JobState.CANCELLED


async def test_worker_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path: Path, fake_model, tiny_data) -> None:
    async with fake_runner(tmp_path, "hang_ignoring_term", cancel_grace_s=0.5) as runner:
        run = await runner.submit(config(fake_model, tiny_data))
        await _wait_running(runner, run.id)
        pid = runner.live_workers()[run.id]
        with anyio.fail_after(10):
            done = await runner.cancel(run.id)
    assert done.state is JobState.CANCELLED and process_gone(pid)


async def test_cancel_while_queued_never_starts_a_worker(tmp_path: Path, fake_model, tiny_data) -> None:
    async with fake_runner(tmp_path, "hang") as runner:
        first = await runner.submit(config(fake_model, tiny_data))
        second = await runner.submit(config(fake_model, tiny_data))
        await _wait_running(runner, first.id)
        assert runner.get(second.id).state is JobState.QUEUED  # one run at a time by default
        cancelled = await runner.cancel(second.id)
        assert cancelled.state is JobState.CANCELLED and cancelled.started_at is None
        await runner.cancel(first.id)
    store = RunStore(tmp_path)
    assert store.get(second.id).state is JobState.CANCELLED
    assert not (Path(second.run_dir) / "events.jsonl").exists()


async def test_queue_runs_in_fifo_order_and_respects_max_concurrent(tmp_path: Path, fake_model, tiny_data) -> None:
    async with fake_runner(tmp_path, "hang", max_concurrent=2) as runner:
        runs = [await runner.submit(config(fake_model, tiny_data)) for _ in range(3)]
        await _wait_running(runner, runs[0].id)
        await _wait_running(runner, runs[1].id)
        # two workers hang forever: a runner that started a third would show it here
        assert set(runner.live_workers()) == {runs[0].id, runs[1].id}
        assert runner.get(runs[2].id).state is JobState.QUEUED and runner.queue_position(runs[2].id) == 2
        await runner.cancel(runs[0].id)
        await _wait_running(runner, runs[2].id)  # the freed slot goes to the next in line
        assert set(runner.live_workers()) == {runs[1].id, runs[2].id}
        for run in runs[1:]:
            await runner.cancel(run.id)
    stored = [RunStore(tmp_path).get(r.id) for r in runs]
    assert [s.state for s in stored] == [JobState.CANCELLED] * 3
    assert stored[0].started_at and stored[2].started_at and stored[0].started_at <= stored[2].started_at


async def test_workers_stdout_goes_to_the_log_not_the_event_channel(tmp_path: Path, fake_model, tiny_data) -> None:
    async with fake_runner(tmp_path, "noisy") as runner:
        run = await runner.submit(config(fake_model, tiny_data))
        done = await runner.wait_until_done(run.id, START_TIMEOUT)
    assert done.state is JobState.SUCCEEDED
    run_dir = Path(done.run_dir)
    assert "MLX-LM-style noise" in (run_dir / "worker.log").read_text()
    assert "noise" not in (run_dir / "events.jsonl").read_text()


@pytest.mark.slow  # waits out the start grace
async def test_runs_left_running_by_a_dead_server_are_orphaned_and_queued_ones_resume(
    tmp_path: Path, fake_model, tiny_data
) -> None:
    async with fake_runner(tmp_path, "hang") as runner:
        running = await runner.submit(config(fake_model, tiny_data))
        queued = await runner.submit(config(fake_model, tiny_data))
        await _wait_running(runner, running.id)
    store = RunStore(tmp_path)
    interrupted = store.get(running.id)  # a clean shutdown stops the worker and says so
    assert interrupted.state is JobState.FAILED and interrupted.error
    assert interrupted.error.kind is FailureKind.INTERRUPTED
    # now simulate a server that died without cleaning up: put the records back as they were
    job = store.get(running.id)
    job.state, job.ended_at, job.error = JobState.RUNNING, None, None
    job.started_at = (job.started_at or 0) - 120  # long enough ago that its missing lease means a dead worker
    store.save(job)
    events = Path(job.run_dir, "events.jsonl")  # and a worker that died before it could write its end
    events.write_text("".join(line for line in events.read_text().splitlines(True) if '"stopped"' not in line))
    queued_job = store.get(queued.id)
    queued_job.state, queued_job.ended_at, queued_job.error = JobState.QUEUED, None, None
    store.save(queued_job)
    async with fake_runner(tmp_path, "succeed") as runner:
        orphan = await runner.wait_until_done(running.id, 5)  # its events read to their end: no end written
        assert orphan.state is JobState.FAILED and orphan.error and orphan.error.kind is FailureKind.ORPHANED
        resumed = await runner.wait_until_done(queued.id, START_TIMEOUT)
    assert resumed.state is JobState.SUCCEEDED


async def test_bad_config_is_rejected_before_anything_is_written(tmp_path: Path, fake_model, tiny_data) -> None:
    async with fake_runner(tmp_path, "succeed") as runner:
        with pytest.raises(ConfigError, match="rank"):
            await runner.submit(config(fake_model, tiny_data, rank=0))
        assert runner.list_runs() == []
    assert list((tmp_path / "runs").iterdir()) == []


async def test_a_stopped_worker_shows_as_stalled_not_running_with_an_eta(
    tmp_path: Path, fake_model, tiny_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.lifecycle import leases

    monkeypatch.setattr(leases, "STALE_S", 1.5)  # the worker beats every second
    async with fake_runner(tmp_path, "hang") as runner:
        run = await runner.submit(config(fake_model, tiny_data))
        await _wait_running(runner, run.id)
        assert runner.get(run.id).stalled_seconds is None
        pid = runner.live_workers()[run.id]
        os.kill(pid, signal.SIGSTOP)  # a hung worker: alive, silent
        try:
            with anyio.fail_after(15):
                while (snap := runner.get(run.id)).stalled_seconds is None:
                    await anyio.sleep(0.2)  # waiting for time to pass is the point here
            assert snap.state is JobState.RUNNING and snap.eta_seconds is None and "STALLED" in snap.summary()
        finally:
            os.kill(pid, signal.SIGCONT)
        await runner.cancel(run.id)


async def test_a_wait_for_the_end_returns_early_on_a_stall(
    tmp_path: Path, fake_model, tiny_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_status(until="end") must not sit out its whole wait on a hung worker: a stall ends it, named."""
    from trainer.lifecycle import leases, views

    monkeypatch.setattr(leases, "STALE_S", 1.5)
    monkeypatch.setattr(views, "STALL_CHECK_S", 0.5)
    async with fake_runner(tmp_path, "hang") as runner:
        run = await runner.submit(config(fake_model, tiny_data))
        await _wait_running(runner, run.id)
        pid = runner.live_workers()[run.id]
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            await runner.wait_for_change(run.id, 30, until="end")
            took = time.monotonic() - start
            assert runner.get(run.id).stalled_seconds is not None and took < 15, took
        finally:
            os.kill(pid, signal.SIGCONT)
        await runner.cancel(run.id)


async def test_caps_on_queued_runs_and_dataset_size_name_the_limit(tmp_path: Path, fake_model, tiny_data) -> None:
    from trainer import RunDefaults

    defaults = RunDefaults.for_home(tmp_path, max_queued=1)
    async with fake_runner(tmp_path, "hang", defaults=defaults) as runner:
        first = await runner.submit(config(fake_model, tiny_data))
        await _wait_running(runner, first.id)
        await runner.submit(config(fake_model, tiny_data))  # one waiting: the limit
        with pytest.raises(ConfigError, match=r"1 runs are queued already, the limit \(max_queued=1, --max-queued\)"):
            await runner.submit(config(fake_model, tiny_data))
        runner.defaults = RunDefaults.for_home(tmp_path, max_dataset_mb=1e-6)
        with pytest.raises(ConfigError, match=r"over the server's limit of 0 MB \(--max-dataset-mb raises it\)"):
            await runner.submit(config(fake_model, tiny_data))
        for run in runner.list_runs():
            await runner.cancel(run.id)
    assert len(RunStore(tmp_path).list_runs()) == 2


@pytest.mark.slow  # 15 s of a locked database
async def test_a_database_locked_for_15_seconds_stops_nothing(tmp_path: Path, fake_model, tiny_data) -> None:
    """Another process holding the run database's write lock past the busy timeout: the run keeps training in its
    worker and the runner keeps following it without stalling its event loop, a new run is refused with a named error
    (and leaves nothing), and everything is recorded once it is free."""
    import sqlite3
    import threading

    from tests.trainer.helpers import fake_env
    from trainer import JobRunner
    from trainer.errors import StoreUnavailable

    async with JobRunner(RunStore(tmp_path), worker_env={**fake_env("slow"), "FAKE_STEP_S": "0.1"}) as runner:
        run = await runner.submit(config(fake_model, tiny_data, iters=200))
        await _wait_running(runner, run.id)
        locked, release = threading.Event(), threading.Event()

        def hold_the_lock() -> None:
            db = sqlite3.connect(tmp_path / "runs.sqlite3", isolation_level=None)
            db.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(120)  # past the store's busy timeout even on a loaded machine; released below
            db.execute("ROLLBACK")
            db.close()

        holder = threading.Thread(target=hold_the_lock)
        holder.start()
        await anyio.to_thread.run_sync(locked.wait)
        # the runner keeps following the run, and the event loop keeps answering, while the database is locked
        seen = runner.get(run.id).iteration
        for _ in range(20):
            tic = time.monotonic()
            await anyio.sleep(0.1)
            assert time.monotonic() - tic < 2, "the event loop stalled behind the locked database"
        assert runner.get(run.id).iteration > seen
        tic = time.monotonic()
        with pytest.raises(StoreUnavailable, match="runs.sqlite3 cannot be written now"):
            await runner.submit(config(fake_model, tiny_data))
        assert time.monotonic() - tic < 100, time.monotonic() - tic
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [run.id]  # nothing half-created
        release.set()
        await anyio.to_thread.run_sync(holder.join)
        done = await runner.wait_until_done(run.id, 60)
    assert done.state is JobState.SUCCEEDED and done.iteration == 200
    stored = RunStore(tmp_path)
    assert stored.get(run.id).state is JobState.SUCCEEDED
    assert stored.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.slow  # 100 worker starts
async def test_100_start_cancel_cycles_leave_no_process(tmp_path: Path, fake_model, tiny_data) -> None:
    """Cancels at every moment of a run's life (queued, its worker starting, training), four runs at a time: each
    cancel returns with the run cancelled and no process of it left."""
    import psutil

    async with fake_runner(tmp_path, "slow", max_concurrent=4, cancel_grace_s=5) as runner:
        cancelled = []
        for batch in range(25):
            runs = [await runner.submit(config(fake_model, tiny_data, iters=10_000)) for _ in range(4)]
            await anyio.sleep(0.3 * (batch % 4))  # 0 s: queued or starting; later: training
            for run in runs:
                cancelled.append(await runner.cancel(run.id))
    assert len(cancelled) == 100 and {snap.state for snap in cancelled} == {JobState.CANCELLED}
    run_dirs = {snap.run_dir for snap in cancelled}
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if set(p.info["cmdline"] or []) & run_dirs]
    assert left == []


async def test_a_busy_database_is_a_debug_line_until_the_retries_add_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under load the database is often busy for a moment: that reads like a fault only once retries add up."""
    import logging

    from trainer.errors import StoreUnavailable
    from trainer.lifecycle import scheduler

    def busy(self: object) -> None:
        raise StoreUnavailable("the run database is locked by another process")

    monkeypatch.setattr(scheduler, "SYNC_S", 0.01)
    monkeypatch.setattr(scheduler, "RETRIES_BEFORE_WARNING", 5)
    with caplog.at_level(logging.DEBUG, logger=scheduler.__name__):
        async with fake_runner(tmp_path, "succeed"):
            monkeypatch.setattr(scheduler.Scheduler, "schedule_once", busy)
            await anyio.sleep(0.5)
    lines = [r for r in caplog.records if "locked by another process" in r.getMessage()]
    assert len(lines) > 5 and [r.levelno for r in lines].count(logging.WARNING) == 1
    assert all(r.levelno == logging.DEBUG for r in lines[:4])
