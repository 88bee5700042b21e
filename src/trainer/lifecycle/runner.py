"""The async job runner: a FIFO queue of runs, each trained by a worker subprocess whose events it reads.

The runner is the one place that changes a run's state (through `Job.transition`), and the parent decides the
final state from the worker's exit status and its last event, as rq does.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..environment.mlx_env import mlx_env
from ..environment.preload import preload_env
from ..errors import RunConflict
from ..planning.config import QLoRAConfig
from ..planning.preflight import preflight
from .events import (
    Checkpoint,
    Event,
    Failed,
    Finished,
    MemorySample,
    PhaseChanged,
    Progress,
    Started,
    TrainReport,
    ValReport,
    decode_line,
)
from .jobs import FailureKind, Job, JobError, JobState, RunSnapshot
from .run_log import read_events, stderr_tail
from .store import RunStore

log = logging.getLogger(__name__)
MEMORY_RING = 2000


@dataclass(frozen=True)
class RunUpdate:
    """A cue that something about a run changed; watchers re-read what they need."""

    run_id: str
    aspect: str  # "created" | "state" | "progress" | "memory" | "metrics"


@dataclass
class _Tracked:
    """What the runner keeps in memory about a run it has seen this session."""

    job: Job
    memory: deque[MemorySample] = field(default_factory=lambda: deque(maxlen=MEMORY_RING))
    train_reports: list[TrainReport] = field(default_factory=list)
    val_reports: list[ValReport] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)
    process: anyio.abc.Process | None = None
    cancel_requested: bool = False
    shutting_down: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)


class JobRunner:
    """Use as `async with JobRunner(store) as runner:`; leaving the block stops every worker."""

    def __init__(
        self,
        store: RunStore,
        *,
        max_concurrent: int = 1,
        cancel_grace_s: float = 10.0,
        worker_env: Mapping[str, str] | None = None,
        memory_budget_gb: float | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent={max_concurrent} must be at least 1")
        self.store = store
        self.max_concurrent = max_concurrent
        self.cancel_grace_s = cancel_grace_s
        self.worker_env = dict(worker_env or {})
        self.memory_budget_gb = memory_budget_gb  # None: the smaller of 16 GB and 75% of physical memory
        self._tracked: dict[str, _Tracked] = {}
        self._queue: deque[str] = deque()
        self._running: set[str] = set()
        self._wake = anyio.Event()
        self._watchers: set[MemoryObjectSendStream[RunUpdate]] = set()
        self._tg: anyio.abc.TaskGroup | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------

    async def __aenter__(self) -> JobRunner:
        self._recover()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._schedule)
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        assert self._tg is not None
        with anyio.CancelScope(shield=True):
            for run_id in list(self._running):
                self._tracked[run_id].shutting_down = True
                await self._stop_worker(self._tracked[run_id], reason="shutdown")
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(*exc)  # type: ignore[arg-type]

    def _recover(self) -> None:
        """Runs left live by a previous server: queued ones queue again, running ones are orphaned."""
        for job in self.store.live():
            if job.state is JobState.QUEUED:
                self._tracked[job.id] = _Tracked(job)
                self._queue.append(job.id)
            else:
                job.transition(
                    JobState.FAILED,
                    error=JobError(
                        kind=FailureKind.ORPHANED,
                        message="the server stopped while this run was training; its last adapter checkpoint "
                        "is in the run folder; start a new run to continue",
                    ),
                )
                self.store.save(job)

    # ---- public API --------------------------------------------------------------------------------------------

    def submit(self, config: QLoRAConfig | dict[str, Any]) -> RunSnapshot:
        """Validate and enqueue a run; returns at once. Raises ConfigError and writes nothing on bad input."""
        parsed = config if isinstance(config, QLoRAConfig) else QLoRAConfig.parse(config)
        checked, _, memory = preflight(parsed, self.memory_budget_gb)
        run_id = secrets.token_hex(4)
        job = Job(
            id=run_id,
            config=checked.model_dump(mode="json"),
            run_dir=str(self.store.run_dir(run_id)),
            iters=checked.iters,
        )
        if memory is not None:
            job.metrics.predicted_peak_gb = memory.prediction.total_gb
        self.store.create(job)
        self._tracked[run_id] = _Tracked(job)
        self._queue.append(run_id)
        self._wake.set()
        self._publish(run_id, "created")
        return job.snapshot()

    def get(self, run_id: str) -> RunSnapshot:
        return self._job(run_id).snapshot()

    def list_runs(self, state: JobState | None = None, limit: int = 50) -> list[RunSnapshot]:
        live = {rid: t.job for rid, t in self._tracked.items()}
        return [live.get(j.id, j).snapshot() for j in self.store.list_runs(state, limit)]

    def memory_samples(self, run_id: str, limit: int | None = None) -> list[MemorySample]:
        samples = list(self._tracker(run_id).memory)
        return samples[-limit:] if limit else samples

    def reports(self, run_id: str) -> tuple[list[TrainReport], list[ValReport]]:
        tracked = self._tracker(run_id)
        return list(tracked.train_reports), list(tracked.val_reports)

    def live_workers(self) -> dict[str, int]:
        """run id -> worker pid, for every worker process alive now."""
        return {
            rid: t.process.pid
            for rid in self._running
            if (t := self._tracked[rid]).process is not None and t.process.returncode is None
        }

    async def wait_for_change(self, run_id: str, timeout: float) -> RunSnapshot:
        """Return when the run's state or iteration changes, or after `timeout` seconds."""
        tracked = self._tracker(run_id)
        before = (tracked.job.state, tracked.job.iteration)
        with anyio.move_on_after(timeout):
            while (tracked.job.state, tracked.job.iteration) == before and not tracked.job.state.terminal:
                await tracked.changed.wait()
        return tracked.job.snapshot()

    async def wait_until_done(self, run_id: str, timeout: float | None = None) -> RunSnapshot:
        tracked = self._tracker(run_id)
        with anyio.fail_after(timeout):
            while not tracked.job.state.terminal:
                await tracked.changed.wait()
        return tracked.job.snapshot()

    async def cancel(self, run_id: str) -> RunSnapshot:
        """Cancel a queued run at once, or stop a running one (SIGTERM, then SIGKILL) and wait until it is gone."""
        tracked = self._tracker(run_id)
        job = tracked.job
        if job.state.terminal:
            raise RunConflict(f"run {run_id} already ended ({job.state.value}); there is nothing to cancel")
        if job.state is JobState.QUEUED:
            self._queue.remove(run_id)
            self._change_state(tracked, JobState.CANCELLED)
            return job.snapshot()
        tracked.cancel_requested = True
        await self._stop_worker(tracked, reason="cancel")
        return job.snapshot()

    @asynccontextmanager
    async def watch(self, buffer: int = 256) -> AsyncIterator[MemoryObjectReceiveStream[RunUpdate]]:
        """A stream of cues about every run; slow watchers miss cues rather than slow the runner."""
        send, receive = anyio.create_memory_object_stream[RunUpdate](buffer)
        self._watchers.add(send)
        try:
            yield receive
        finally:
            self._watchers.discard(send)
            send.close()
            receive.close()

    # ---- internals ---------------------------------------------------------------------------------------------

    def _job(self, run_id: str) -> Job:
        tracked = self._tracked.get(run_id)
        return tracked.job if tracked else self.store.get(run_id)

    def _tracker(self, run_id: str) -> _Tracked:
        """The in-memory view of a run; a run from an earlier session is rebuilt from its events.jsonl."""
        tracked = self._tracked.get(run_id)
        if tracked is None:
            tracked = _Tracked(self.store.get(run_id))
            for event in read_events(Path(tracked.job.run_dir)):
                self._remember(tracked, event)
            self._tracked[run_id] = tracked
        return tracked

    def _publish(self, run_id: str, aspect: str) -> None:
        for send in list(self._watchers):
            try:
                send.send_nowait(RunUpdate(run_id, aspect))
            except anyio.WouldBlock:
                pass
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                self._watchers.discard(send)

    def _touch(self, tracked: _Tracked, aspect: str) -> None:
        tracked.changed.set()
        tracked.changed = anyio.Event()
        self._publish(tracked.job.id, aspect)

    def _change_state(self, tracked: _Tracked, to: JobState, error: JobError | None = None) -> None:
        tracked.job.transition(to, error=error)
        self.store.save(tracked.job)
        if to.terminal:
            tracked.done.set()
        self._touch(tracked, "state")

    async def _schedule(self) -> None:
        assert self._tg is not None
        while True:
            while self._queue and len(self._running) < self.max_concurrent:
                run_id = self._queue.popleft()
                self._running.add(run_id)
                self._tg.start_soon(self._run_worker, self._tracked[run_id])
            await self._wake.wait()
            self._wake = anyio.Event()

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.worker_env)
        env["PYTHONUNBUFFERED"] = "1"
        return preload_env(mlx_env(env, self.store.root))

    async def _run_worker(self, tracked: _Tracked) -> None:
        job = tracked.job
        run_dir = Path(job.run_dir)
        try:
            self._change_state(tracked, JobState.RUNNING)
            read_fd, write_fd = os.pipe()
            # local files opened once per run: not worth a thread hop
            with open(run_dir / "worker.log", "ab") as worker_log, os.fdopen(read_fd, "rb") as channel:  # noqa: ASYNC230
                try:
                    tracked.process = await anyio.open_process(
                        [sys.executable, "-m", "trainer.lifecycle.worker", str(run_dir), "--event-fd", str(write_fd)],
                        stdin=subprocess.PIPE,
                        stdout=worker_log,
                        stderr=worker_log,
                        pass_fds=[write_fd],
                        start_new_session=True,  # its own process group, so cancel reaches its children too
                        env=self._worker_env(),
                    )
                finally:
                    os.close(write_fd)
                job.pid = tracked.process.pid
                self.store.save(job)
                if tracked.cancel_requested:  # cancelled while the process was starting
                    _signal_group(job.pid, signal.SIGTERM)
                last = await self._pump_events(tracked, channel, run_dir / "events.jsonl")
                exit_code = await tracked.process.wait()
            self._finish(tracked, last, exit_code)
        except OSError as exc:  # the worker could not be started at all
            log.exception("run %s: could not start its worker", job.id)
            error = JobError(kind=FailureKind.BACKEND, message=f"could not start the worker process: {exc}")
            self._change_state(tracked, JobState.FAILED, error)
        finally:
            self._running.discard(job.id)
            self._wake.set()

    async def _pump_events(self, tracked: _Tracked, channel: BinaryIO, events_path: Path) -> Event | None:
        last: Event | None = None
        with open(events_path, "ab") as events_file:  # noqa: ASYNC230
            while True:
                line = await anyio.to_thread.run_sync(channel.readline, abandon_on_cancel=True)
                if not line:
                    return last  # EOF: the worker (and anything it started) closed the channel
                events_file.write(line)
                events_file.flush()
                try:
                    event = decode_line(line)
                except ValueError:
                    log.warning("run %s: ignoring a malformed event line %r", tracked.job.id, line[:200])
                    continue
                if isinstance(event, Finished | Failed):
                    last = event
                self._apply(tracked, event)

    def _remember(self, tracked: _Tracked, event: Event) -> None:
        """Update the in-memory view and the run record from one event (no state change here)."""
        job, metrics = tracked.job, tracked.job.metrics
        if isinstance(event, MemorySample):
            tracked.memory.append(event)
            metrics.peak_memory_gb = max(metrics.peak_memory_gb or 0.0, event.peak_gb)
        elif isinstance(event, TrainReport):
            tracked.train_reports.append(event)
            job.iteration = max(job.iteration, event.iteration)
            metrics.last_train_loss = event.train_loss
            metrics.learning_rate = event.learning_rate
            metrics.iterations_per_second = event.iterations_per_second
            metrics.tokens_per_second = event.tokens_per_second
            metrics.trained_tokens = event.trained_tokens
            metrics.peak_memory_gb = max(metrics.peak_memory_gb or 0.0, event.peak_memory)
        elif isinstance(event, ValReport):
            tracked.val_reports.append(event)
            if metrics.first_val_loss is None:
                metrics.first_val_loss = event.val_loss
            metrics.last_val_loss = event.val_loss
        elif isinstance(event, Progress):
            job.iteration = max(job.iteration, event.iteration)
        elif isinstance(event, PhaseChanged):
            job.phase = event.phase
        elif isinstance(event, Failed) and event.adapter_path:
            job.adapter_path = event.adapter_path
        elif isinstance(event, Checkpoint | Finished):
            job.adapter_path = str(Path(event.path).parent) if isinstance(event, Checkpoint) else event.adapter_path

    def _apply(self, tracked: _Tracked, event: Event) -> None:
        self._remember(tracked, event)
        if isinstance(event, Started):
            return
        if not isinstance(event, MemorySample):
            self.store.save(tracked.job)
        aspect = {MemorySample: "memory", TrainReport: "metrics", ValReport: "metrics"}.get(type(event), "progress")
        self._touch(tracked, aspect)

    def _finish(self, tracked: _Tracked, last: Event | None, exit_code: int) -> None:
        """The parent decides: the worker's last event and its exit status give the final state."""
        run_dir = Path(tracked.job.run_dir)
        if isinstance(last, Finished) and exit_code == 0:
            tracked.job.iteration = tracked.job.iters
            self._change_state(tracked, JobState.SUCCEEDED)
        elif tracked.cancel_requested:
            self._change_state(tracked, JobState.CANCELLED)
        elif tracked.shutting_down:
            error = JobError(
                kind=FailureKind.INTERRUPTED,
                message=f"the server shut down at iteration {tracked.job.iteration}; the adapter so far is in "
                f"{tracked.job.config.get('adapter_dir') or run_dir / 'adapters'}",
                exit_code=exit_code,
            )
            self._change_state(tracked, JobState.FAILED, error)
        elif isinstance(last, Failed):
            error = JobError(
                kind=last.kind, message=last.message, exit_code=exit_code, stderr_tail=stderr_tail(run_dir)
            )
            self._change_state(tracked, JobState.FAILED, error)
        else:
            self._change_state(tracked, JobState.FAILED, crash_error(exit_code, run_dir))

    async def _stop_worker(self, tracked: _Tracked, *, reason: str) -> None:
        process = tracked.process
        if process is None or process.returncode is not None:
            if reason == "cancel":  # starting or ending right now; _run_worker sees cancel_requested
                await tracked.done.wait()
            return
        log.info("run %s: stopping worker %d (%s)", tracked.job.id, process.pid, reason)
        _signal_group(process.pid, signal.SIGTERM)
        with anyio.move_on_after(self.cancel_grace_s):
            await tracked.done.wait()
            return
        log.warning("run %s: worker ignored SIGTERM for %.0fs; killing it", tracked.job.id, self.cancel_grace_s)
        _signal_group(process.pid, signal.SIGKILL)
        await tracked.done.wait()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def crash_error(exit_code: int, run_dir: Path) -> JobError:
    if exit_code < 0:
        how = f"was killed by signal {signal.Signals(-exit_code).name}"
        if -exit_code == signal.SIGKILL:
            how += " (often the kernel's out-of-memory killer; check the memory samples)"
    else:
        how = f"exited with status {exit_code} without reporting a result"
    return JobError(
        kind=FailureKind.CRASHED,
        message=f"the worker {how}; see {run_dir / 'worker.log'}",
        exit_code=exit_code,
        stderr_tail=stderr_tail(run_dir),
    )
