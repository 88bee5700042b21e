"""The job runner: accepts runs, queues them, trains each in a worker subprocess and keeps their records current.

It is the one place that changes a run's state (through `Job.transition`), with what `tracking.final_outcome`
decides from the worker's last event and exit status. Watchers get `RunUpdate` cues naming what changed.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..environment.mlx_env import mlx_env
from ..environment.preload import preload_env
from ..errors import RunConflict
from ..planning.config import QLoRAConfig
from ..planning.preflight import PreparedRun, RunDefaults, prepare_run
from .events import Event, EventReader, Failed, Finished, MemorySample, TrainReport, ValReport
from .jobs import FailureKind, Job, JobError, JobState, RunSnapshot
from .memory import WorkerMemory
from .process import WorkerProcess
from .run_log import read_events, stderr_tail
from .scheduler import Scheduler
from .store import RunStore
from .tracking import Ending, RunAspect, RunHistory, apply_event, final_outcome

log = logging.getLogger(__name__)
#: finished runs from earlier sessions kept rebuilt in memory (each rebuild reads its events.jsonl)
REBUILT_CACHE = 32


@dataclass(frozen=True)
class RunUpdate:
    """A cue that something about a run changed; watchers re-read what they need."""

    run_id: str
    aspects: frozenset[RunAspect]
    created: bool = False


@dataclass
class _Tracked:
    """What the runner keeps in memory about a run it has seen this session."""

    job: Job
    history: RunHistory = field(default_factory=RunHistory)
    changed: anyio.Event = field(default_factory=anyio.Event)
    worker: WorkerProcess | None = None
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
        defaults: RunDefaults | None = None,
    ) -> None:
        self.store = store
        self.cancel_grace_s = cancel_grace_s
        self.worker_env = dict(worker_env or {})
        self.defaults = defaults or RunDefaults.for_home(store.root)
        self._scheduler = Scheduler(max_concurrent)
        self._tracked: dict[str, _Tracked] = {}
        self._rebuilt: OrderedDict[str, _Tracked] = OrderedDict()
        self._watchers: set[MemoryObjectSendStream[RunUpdate]] = set()
        self._tg: anyio.abc.TaskGroup | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------

    async def __aenter__(self) -> JobRunner:
        self._recover()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._scheduler.run, self._tg, self._run_worker)
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        assert self._tg is not None
        with anyio.CancelScope(shield=True):
            for run_id in self._scheduler.running:
                tracked = self._tracked[run_id]
                tracked.shutting_down = True
                await self._stop(tracked)
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(*exc)  # type: ignore[arg-type]

    def _recover(self) -> None:
        """Runs left live by a previous server: queued ones queue again, running ones are orphaned."""
        for job in self.store.live():
            if job.state is JobState.QUEUED:
                self._tracked[job.id] = _Tracked(job)
                self._scheduler.enqueue(job.id)
                continue
            message = (
                "the server stopped while this run was training; its last adapter checkpoint is in the run folder; "
                "start a new run to continue"
            )
            job.transition(JobState.FAILED, error=JobError(kind=FailureKind.ORPHANED, message=message))
            self.store.save(job)

    # ---- public API --------------------------------------------------------------------------------------------

    async def submit(self, config: QLoRAConfig | dict[str, Any]) -> RunSnapshot:
        """Check and enqueue a run; returns once it is queued. Raises ConfigError and writes nothing on bad input.

        The checks (model resolution, a GGUF import, reading the dataset) run in a thread: they may take seconds.
        """
        parsed = config if isinstance(config, QLoRAConfig) else QLoRAConfig.parse(config)
        prepared = await anyio.to_thread.run_sync(prepare_run, parsed, self.defaults)
        return self.enqueue(prepared)

    def enqueue(self, prepared: PreparedRun) -> RunSnapshot:
        run_id = secrets.token_hex(4)
        job = Job(
            id=run_id, config=prepared.config, run_dir=str(self.store.run_dir(run_id)), iters=prepared.config.iters
        )
        job.metrics.predicted_peak_gb = prepared.predicted_peak_gb
        self.store.create(job, prepared.model_dump_json(indent=2))
        self._tracked[run_id] = _Tracked(job)
        self._scheduler.enqueue(run_id)
        self._publish(RunUpdate(run_id, frozenset({RunAspect.STATUS}), created=True))
        return job.snapshot()

    def get(self, run_id: str) -> RunSnapshot:
        tracked = self._tracked.get(run_id)
        return (tracked.job if tracked else self.store.get(run_id)).snapshot()

    def list_runs(self, state: JobState | None = None, limit: int = 50) -> list[RunSnapshot]:
        return [
            self._tracked[j.id].job.snapshot() if j.id in self._tracked else j.snapshot()
            for j in self.store.list_runs(state, limit)
        ]

    def memory_samples(self, run_id: str, limit: int | None = None) -> list[MemorySample]:
        """The run's latest memory samples, oldest first: `limit` of them (0: none), or all that are kept."""
        samples = list(self._tracker(run_id).history.memory)
        if limit is None:
            return samples
        return samples[-limit:] if limit > 0 else []

    def reports(self, run_id: str) -> tuple[list[TrainReport], list[ValReport]]:
        history = self._tracker(run_id).history
        return list(history.train_reports), list(history.val_reports)

    def queue_position(self, run_id: str) -> int:
        """0 when the run is not waiting; n when n runs (running or queued) start before it."""
        return self._scheduler.position(run_id)

    def live_workers(self) -> dict[str, int]:
        """run id -> worker pid, for every worker process alive now."""
        return {
            rid: t.worker.pid
            for rid in self._scheduler.running
            if (t := self._tracked[rid]).worker is not None and t.worker.alive
        }

    def worker_memory(self) -> list[WorkerMemory]:
        """Each live worker's RSS now and its latest MLX numbers (MLX's allocator is only readable from inside)."""
        from .memory import process_memory

        workers = []
        for run_id, pid in self.live_workers().items():
            try:
                rss = process_memory(pid).rss_gb
            except ProcessLookupError:
                continue
            last = self.memory_samples(run_id, 1)
            sample = last[0] if last else None
            workers.append(
                WorkerMemory(
                    run_id=run_id,
                    pid=pid,
                    rss_gb=rss,
                    mlx_active_gb=sample.active_gb if sample else None,
                    mlx_peak_gb=sample.peak_gb if sample else None,
                    mlx_cache_gb=sample.cache_gb if sample else None,
                    sampled_at=sample.ts if sample else None,
                )
            )
        return workers

    def adapter_for(self, run_id: str) -> tuple[str, str]:
        """The run's base model and adapter folder, for generating through it; RunConflict if it has none yet."""
        snap = self.get(run_id)
        if not snap.adapter_path:
            raise RunConflict(
                f"run {run_id} has no adapter yet (it is {snap.state.value}); wait until it has saved a checkpoint "
                "or succeeded (run_status shows adapter_path)"
            )
        return snap.config.model, snap.adapter_path

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
        if job.state is JobState.QUEUED and self._scheduler.remove(run_id):
            self._change_state(tracked, JobState.CANCELLED)
            return job.snapshot()
        tracked.cancel_requested = True
        await self._stop(tracked)
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

    def _tracker(self, run_id: str) -> _Tracked:
        """The in-memory view of a run; a run from an earlier session is rebuilt from its events.jsonl (and kept
        among the last REBUILT_CACHE such runs)."""
        tracked = self._tracked.get(run_id) or self._rebuilt.get(run_id)
        if tracked is not None:
            if run_id in self._rebuilt:
                self._rebuilt.move_to_end(run_id)
            return tracked
        tracked = _Tracked(self.store.get(run_id))
        for event in read_events(Path(tracked.job.run_dir)):
            apply_event(tracked.job, tracked.history, event)
        self._rebuilt[run_id] = tracked
        while len(self._rebuilt) > REBUILT_CACHE:
            self._rebuilt.popitem(last=False)
        return tracked

    def _publish(self, update: RunUpdate) -> None:
        for send in list(self._watchers):
            try:
                send.send_nowait(update)
            except anyio.WouldBlock:
                pass
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                self._watchers.discard(send)

    def _touch(self, tracked: _Tracked, aspects: frozenset[RunAspect]) -> None:
        tracked.changed.set()
        tracked.changed = anyio.Event()
        self._publish(RunUpdate(tracked.job.id, aspects))

    def _change_state(self, tracked: _Tracked, to: JobState, error: JobError | None = None) -> None:
        tracked.job.transition(to, error=error)
        self.store.save(tracked.job)
        if to.terminal:
            tracked.done.set()
        self._touch(tracked, frozenset({RunAspect.STATUS}))

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.worker_env)
        env["PYTHONUNBUFFERED"] = "1"
        return preload_env(mlx_env(env, self.store.root))

    async def _run_worker(self, run_id: str) -> None:
        tracked = self._tracked[run_id]
        job = tracked.job
        try:
            self._change_state(tracked, JobState.RUNNING)
            run_dir = Path(job.run_dir)
            try:
                tracked.worker = worker = await WorkerProcess.start(run_dir, self._worker_env())
            except OSError as exc:  # the worker could not be started at all
                log.exception("run %s: could not start its worker", job.id)
                failure = JobError(kind=FailureKind.BACKEND, message=f"could not start the worker process: {exc}")
                self._change_state(tracked, JobState.FAILED, failure)
                return
            try:
                job.pid = worker.pid
                self.store.save(job)
                if tracked.cancel_requested or tracked.shutting_down:  # stopped while the process was starting
                    worker.signal(signal.SIGTERM)
                last = await self._pump_events(tracked, worker, run_dir / "events.jsonl")
                exit_code = await worker.wait()
            finally:
                worker.close()
            ending = Ending(last, exit_code, tracked.cancel_requested, tracked.shutting_down, stderr_tail(run_dir))
            state, error = final_outcome(job, ending)
            if state is JobState.SUCCEEDED:
                job.iteration = job.iters
            self._change_state(tracked, state, error)
        finally:
            self._scheduler.done(job.id)

    async def _pump_events(self, tracked: _Tracked, worker: WorkerProcess, events_path: Path) -> Event | None:
        """Append each line to events.jsonl, fold each event into the run; return its Finished or Failed."""
        last: Event | None = None
        reader = EventReader()
        with open(events_path, "ab") as events_file:  # noqa: ASYNC230
            async for line in worker.lines():
                events_file.write(line)
                events_file.flush()
                try:
                    event = reader.decode(line)
                except ValueError as exc:
                    log.warning("run %s: ignoring an event line (%s): %r", tracked.job.id, exc, line[:200])
                    continue
                if isinstance(event, Finished | Failed):
                    last = event
                aspects = apply_event(tracked.job, tracked.history, event)
                if aspects and not isinstance(event, MemorySample):
                    self.store.save(tracked.job)
                if aspects:
                    self._touch(tracked, aspects)
        return last

    async def _stop(self, tracked: _Tracked) -> None:
        worker = tracked.worker
        if worker is None or not worker.alive:  # starting or ending right now: _run_worker sees the flags
            await tracked.done.wait()
            return
        await worker.stop(self.cancel_grace_s, tracked.done, f"run {tracked.job.id}")
