"""The job runner: accepts runs, queues them in the store, trains each in a worker process, keeps records current.

Runs belong to the store, not to a runner: the queue is the store's queued runs, started oldest first by whichever
runner on the home holds the scheduler row (leases.py), and every runner follows every live run (follow.py), so a
runner that starts on a home adopts the runs a previous one left training. With `detach=True` (the MCP server)
workers outlive the runner; with `detach=False` (the CLI) leaving the runner stops them. It is the one place that
changes a run's state (through `Job.transition`), with what `tracking.final_outcome` decides; where several runners
follow one run, the first to record its end wins. Watchers get `RunUpdate` cues naming what changed.
"""

from __future__ import annotations

import logging
import secrets
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream

from ..environment.process_env import worker_environment
from ..errors import ConfigError, RunConflict, StoreUnavailable
from ..planning.config import QLoRAConfig
from ..planning.preflight import PreparedRun, RunDefaults, prepare_run
from .admission import admit
from .cues import Cues, RunUpdate
from .deletion import DeletedRun, delete_run
from .events import Event, MemorySample
from .follow import START_GRACE_S, Liveness, follow_events
from .jobs import FailureKind, Job, JobError, JobState, RunSnapshot
from .leases import SchedulerElection, read_lease
from .process import WorkerProcess, signal_group
from .resume import ResumePlan, plan_resume
from .run_log import disk_free, read_events, stderr_tail
from .stopping import stop_worker
from .store import RunStore
from .tracking import Ending, RunAspect, apply_event, final_outcome, last_checkpoint
from .views import RunViews, Tracked

log = logging.getLogger(__name__)
#: finished runs from earlier sessions kept rebuilt in memory (each rebuild reads its events.jsonl)
REBUILT_CACHE = 32
#: seconds between looks at the store for runs other runners accepted, started or cancelled
SYNC_S = 0.5
#: seconds the runner's own writes on the event loop wait for a lock another process holds (then retried later)
LOOP_LOCK_WAIT_S = 0.2
#: seconds progress updates are skipped after the database refused one
QUIET_SAVE_BACKOFF_S = 2.0
_STATUS = frozenset({RunAspect.STATUS})


class JobRunner(RunViews):
    """Use as `async with JobRunner(store) as runner:`; see the module docstring for `detach`."""

    def __init__(
        self,
        store: RunStore,
        *,
        max_concurrent: int = 1,
        cancel_grace_s: float = 10.0,
        worker_env: Mapping[str, str] | None = None,
        defaults: RunDefaults | None = None,
        detach: bool = False,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent={max_concurrent} must be at least 1")
        self.store = store
        self.max_concurrent = max_concurrent
        self.cancel_grace_s = cancel_grace_s
        self.worker_env = dict(worker_env or {})
        self.defaults = defaults or RunDefaults.for_home(store.root)
        self.detach = detach
        self._election = SchedulerElection(store, holder=secrets.token_hex(8))
        self._wake = anyio.Event()
        self._tracked: dict[str, Tracked] = {}
        self._rebuilt: OrderedDict[str, Tracked] = OrderedDict()
        self._cues = Cues()
        self._unsaved: dict[str, tuple[Tracked, JobState]] = {}  # ends the database refused, retried
        self._quiet_saves_resume_at = 0.0
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> JobRunner:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._sync()
        self._tg.start_soon(self._schedule)
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        assert self._tg is not None
        with anyio.CancelScope(shield=True):
            if not self.detach:
                for tracked in list(self._tracked.values()):
                    if tracked.worker is not None and not tracked.done.is_set():
                        tracked.shutting_down = True
                        await self._stop(tracked)
            with suppress(StoreUnavailable):  # the row goes stale and the next server takes it anyway
                self._election.release()
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(*exc)  # type: ignore[arg-type]

    async def _schedule(self) -> None:
        """Keep up with the store: start queued runs while this runner is the scheduler, follow every live run."""
        assert self._tg is not None
        while True:
            try:  # a locked or full database stops nothing: runs go on in their workers, and this retries
                with self.store.lock_wait(LOOP_LOCK_WAIT_S):
                    self._schedule_once()
            except StoreUnavailable as exc:
                log.warning("%s; retrying in %.1f s", exc, SYNC_S)
            with anyio.move_on_after(SYNC_S):
                await self._wake.wait()
            self._wake = anyio.Event()

    def _schedule_once(self) -> None:
        """One look at the store: record refused ends, and start what is queued while this runner schedules."""
        assert self._tg is not None
        self._sync()
        for tracked, before in list(self._unsaved.values()):
            self._record_end(tracked, before)
        if self._election.hold():
            while (job := self.store.claim_next(self.max_concurrent)) is not None:
                tracked = self._track(job)
                tracked.job = job
                self._touch(tracked, _STATUS)
                tracked.following = True
                self._tg.start_soon(self._run_worker, tracked)

    def _sync(self) -> None:
        """Track every live run in the store: new queued ones, and running ones nobody here follows yet (started by
        another runner, or left by a previous one); fail those whose worker is gone."""
        live = {job.id: job for job in self.store.live()}
        for run_id, stored in live.items():
            tracked = self._tracked.get(run_id)
            if tracked is None:
                tracked = self._track(stored)
            elif tracked.job.state.terminal and stored.attempt > tracked.job.attempt:  # resumed by another runner
                self._tracked[run_id] = tracked = Tracked(stored)
                self._touch(tracked, _STATUS)
            elif tracked.job.state is JobState.QUEUED and stored.state is not JobState.QUEUED:
                tracked.job = stored  # another runner started it
                self._touch(tracked, _STATUS)
            if tracked.job.state is JobState.RUNNING and not tracked.following:
                self._adopt(tracked)
        for tracked in list(self._tracked.values()):
            if tracked.job.state is JobState.QUEUED and tracked.job.id not in live:  # cancelled elsewhere
                tracked.job = self.store.get(tracked.job.id)
                tracked.done.set()
                self._touch(tracked, _STATUS)

    def _track(self, job: Job) -> Tracked:
        tracked = self._tracked.get(job.id)
        if tracked is None:
            tracked = self._tracked[job.id] = Tracked(job)
            self._rebuilt.pop(job.id, None)
            self._cues.publish(RunUpdate(job.id, _STATUS, created=True))
        return tracked

    def _adopt(self, tracked: Tracked) -> None:
        """Follow a run another runner started (or left): from its first event, while its worker lives. A worker
        that is gone already is read to its end: what it wrote says how it ended, and nothing means `orphaned`."""
        assert self._tg is not None
        job = tracked.job
        started = job.started_at or time.time()
        lease = read_lease(self.store, job.id)
        never_started = lease is None and time.time() - started > START_GRACE_S
        tracked.following = True
        if never_started or (lease is not None and not lease.alive()):
            message = (
                f"the worker of this run is gone and no server saw it end (at iteration {job.iteration}); "
                f"{last_checkpoint(job)}"
            )
            self._tg.start_soon(self._follow, tracked, Liveness(lambda: None, claimed_at=0.0), message)
            return
        liveness = Liveness(lambda: read_lease(self.store, job.id), claimed_at=started)
        self._tg.start_soon(self._follow, tracked, liveness)
        log.info("run %s: following the worker %s", job.id, lease.pid if lease else "(starting)")

    # ---- public API --------------------------------------------------------------------------------------------

    async def submit(
        self, config: QLoRAConfig | dict[str, Any], progress: Callable[[float], None] | None = None
    ) -> RunSnapshot:
        """Check and enqueue a run; returns once it is queued. Raises ConfigError and writes nothing on bad input.
        The checks (model resolution, a GGUF import, reading the dataset) run in a thread, `progress` getting the
        fraction of the dataset read: they may take a minute for a large dataset."""
        parsed = config if isinstance(config, QLoRAConfig) else QLoRAConfig.parse(config)
        prepared = await anyio.to_thread.run_sync(prepare_run, parsed, self.defaults, progress)
        await anyio.lowlevel.checkpoint_if_cancelled()  # the caller gave up during the checks: queue nothing
        return self.enqueue(prepared)

    def enqueue(self, prepared: PreparedRun) -> RunSnapshot:
        """Queue a prepared run (ConfigError when the queue is full or a live run writes to its adapter_dir)."""
        admit(self.store, prepared, self.defaults.max_queued)
        run_id = secrets.token_hex(4)
        job = Job(
            id=run_id, config=prepared.config, run_dir=str(self.store.run_dir(run_id)), iters=prepared.config.iters
        )
        job.metrics.predicted_peak_gb = prepared.predicted_peak_gb
        self.store.create(job, prepared.model_dump_json(indent=2))
        self._track(job)
        self._wake.set()
        return job.snapshot()

    async def resume(self, run_id: str, force: bool = False) -> tuple[RunSnapshot, ResumePlan]:
        """Queue a run that ended (failed or cancelled) again, as its next attempt, to continue from its newest
        checkpoint that verifies. RunConflict for a run that is live or succeeded; ConfigError when its data or model
        changed since that checkpoint (unless `force`) or the queue is full."""
        plan = await anyio.to_thread.run_sync(plan_resume, self._tracker(run_id).job, force)
        await anyio.lowlevel.checkpoint_if_cancelled()
        queued = self.store.count(JobState.QUEUED)
        if queued >= self.defaults.max_queued:
            raise ConfigError(
                f"{queued} runs are queued already, the limit (max_queued={self.defaults.max_queued}, --max-queued)"
            )
        job = self.store.get(run_id)
        before = job.state
        job.transition(JobState.QUEUED)
        job.iteration = plan.step
        if not self.store.requeue(job, if_state=before):
            raise RunConflict(f"run {run_id} changed while it was being resumed (resumed elsewhere?); see run_status")
        self._rebuilt.pop(run_id, None)
        tracked = self._tracked[run_id] = Tracked(job)
        self._touch(tracked, _STATUS)
        self._wake.set()
        log.info("%s (attempt %d)", plan.describe(), job.attempt)
        return job.snapshot(), plan

    async def delete(self, run_id: str) -> DeletedRun:
        """Delete an ended run's record, folder and the adapter files it wrote (refused while it is live)."""
        deleted = await anyio.to_thread.run_sync(delete_run, self.store, run_id)
        self._tracked.pop(run_id, None)
        return deleted

    async def cancel(self, run_id: str) -> RunSnapshot:
        """Cancel a queued run at once, or stop a running one (SIGTERM, then SIGKILL) and wait until it is gone."""
        tracked = self._tracker(run_id)
        job = tracked.job
        if job.state.terminal:
            raise RunConflict(f"run {run_id} already ended ({job.state.value}); there is nothing to cancel")
        if job.state is JobState.QUEUED:
            job.transition(JobState.CANCELLED)
            if self.store.save(job, if_state=JobState.QUEUED):
                tracked.done.set()
                self._touch(tracked, _STATUS)
                return job.snapshot()
            tracked.job = self.store.get(run_id)  # it started meanwhile: stop its worker instead
            self._sync()
        self.store.request_cancel(run_id)
        tracked.cancel_requested = True
        await self._stop(tracked)
        return tracked.job.snapshot()

    def watch(self, buffer: int = 256) -> AbstractAsyncContextManager[MemoryObjectReceiveStream[RunUpdate]]:
        """A stream of cues about every run; slow watchers miss cues rather than slow the runner."""
        return self._cues.watch(buffer)

    # ---- internals ---------------------------------------------------------------------------------------------

    def _tracker(self, run_id: str) -> Tracked:
        """The in-memory view of a run; a finished run from an earlier session is rebuilt from its events.jsonl (and
        kept among the last REBUILT_CACHE such runs)."""
        tracked = self._tracked.get(run_id) or self._rebuilt.get(run_id)
        if tracked is None and not self.store.get(run_id).state.terminal:
            self._sync()  # live, accepted by another runner since our last look
            tracked = self._tracked.get(run_id)
        if tracked is not None:
            if run_id in self._rebuilt:
                self._rebuilt.move_to_end(run_id)
            return tracked
        tracked = Tracked(self.store.get(run_id))
        tracked.done.set()
        for event in read_events(Path(tracked.job.run_dir)):
            apply_event(tracked.job, tracked.history, event)
        self._rebuilt[run_id] = tracked
        while len(self._rebuilt) > REBUILT_CACHE:
            self._rebuilt.popitem(last=False)
        return tracked

    def _touch(self, tracked: Tracked, aspects: frozenset[RunAspect]) -> None:
        tracked.changed.set()
        tracked.changed = anyio.Event()
        self._cues.publish(RunUpdate(tracked.job.id, aspects))

    def _finish(self, tracked: Tracked, state: JobState, error: JobError | None = None) -> None:
        """Record the run's end, unless another runner following it recorded it first (then take theirs)."""
        before = tracked.job.state
        tracked.job.transition(state, error=error)
        self._record_end(tracked, before)
        tracked.done.set()
        self._touch(tracked, _STATUS)
        self._wake.set()  # a slot is free

    def _record_end(self, tracked: Tracked, before: JobState) -> None:
        """Write a run's end to the store; while the database cannot be written, keep it to retry (_schedule)."""
        try:
            if not self.store.save(tracked.job, if_state=before):
                tracked.job = self.store.get(tracked.job.id)
            self._unsaved.pop(tracked.job.id, None)
        except StoreUnavailable as exc:
            log.warning("run %s ended %s, not recorded yet: %s", tracked.job.id, tracked.job.state.value, exc)
            self._unsaved[tracked.job.id] = (tracked, before)

    def _save_quietly(self, job: Job) -> None:
        """A progress update of the record: one the database refuses now is written with a later one. It runs on the
        event loop, so it waits for a lock only briefly and, once refused, skips updates for a while: a database held
        locked by another process must not stall every run this runner follows (and every tool call)."""
        if time.monotonic() < self._quiet_saves_resume_at:
            return
        try:
            with self.store.lock_wait(LOOP_LOCK_WAIT_S):
                self.store.save(job)
        except StoreUnavailable as exc:
            self._quiet_saves_resume_at = time.monotonic() + QUIET_SAVE_BACKOFF_S
            log.warning("run %s: record not updated: %s", job.id, exc)

    async def _run_worker(self, tracked: Tracked) -> None:
        """Start the worker of a run this runner claimed, and follow it to its end."""
        job = tracked.job
        try:
            worker = await WorkerProcess.start(
                Path(job.run_dir),
                self.store.db_path,
                worker_environment(self.worker_env, self.store.root),
                attempt=job.attempt,
            )
        except OSError as exc:  # the worker could not be started at all
            log.exception("run %s: could not start its worker", job.id)
            failure = JobError(kind=FailureKind.BACKEND, message=f"could not start the worker process: {exc}")
            self._finish(tracked, JobState.FAILED, failure)
            return
        tracked.worker = worker
        job.pid = worker.pid
        self._save_quietly(job)
        liveness = Liveness(lambda: read_lease(self.store, job.id), exited=anyio.Event())

        async def reap() -> None:
            liveness.exit_code = await worker.wait()
            signal_group(worker.pid, signal.SIGKILL)  # what the worker started and left behind (its other ranks)
            assert liveness.exited is not None
            liveness.exited.set()

        assert self._tg is not None
        self._tg.start_soon(reap)
        if tracked.cancel_requested or tracked.shutting_down:  # stopped while the process was starting
            self._stop_once(tracked, worker.pid)
        try:
            await self._follow(tracked, liveness)
        finally:
            worker.close()

    async def _follow(self, tracked: Tracked, liveness: Liveness, orphaned: str | None = None) -> None:
        """Apply the run's events until its worker is gone, then record how it ended (`orphaned`: the message for
        a worker found gone that wrote no end)."""
        job = tracked.job
        run_dir = Path(job.run_dir)

        def apply(event: Event) -> None:
            aspects = apply_event(tracked.job, tracked.history, event)
            if aspects and not isinstance(event, MemorySample):
                self._save_quietly(tracked.job)
            if aspects:
                self._touch(tracked, aspects)

        last = await follow_events(job.id, run_dir / "events.jsonl", liveness, apply, attempt=job.attempt)
        if last is None and orphaned is not None:
            self._finish(tracked, JobState.FAILED, JobError(kind=FailureKind.ORPHANED, message=orphaned))
            return
        cancelled = tracked.cancel_requested or self.store.cancel_requested(job.id)
        ending = Ending(
            last, liveness.exit_code, cancelled, tracked.shutting_down, stderr_tail(run_dir), disk_free(run_dir)
        )
        state, error = final_outcome(tracked.job, ending)
        if state is JobState.SUCCEEDED:
            tracked.job.iteration = tracked.job.iters
        self._finish(tracked, state, error)

    async def _stop(self, tracked: Tracked) -> None:
        """Stop the run's worker once, however many ask; return once it ended. The stop runs in the runner's own task
        group: a caller that stops waiting (a cancelled request) leaves it going, SIGKILL included."""
        pid = tracked.worker.pid if tracked.worker else tracked.job.pid
        if pid is not None:  # else starting right now: _run_worker stops it once it has a process
            self._stop_once(tracked, pid)
        await tracked.done.wait()

    def _stop_once(self, tracked: Tracked, pid: int) -> None:
        if not tracked.stopping:
            tracked.stopping = True
            job, pace, grace = tracked.job, tracked.history.pace, self.cancel_grace_s
            assert self._tg is not None
            lease = partial(read_lease, self.store, job.id)
            self._tg.start_soon(stop_worker, pid, pace, grace, tracked.done, f"run {job.id}", lease)
