"""The write side of a runner: start queued runs while this runner holds the scheduler row (leases.py), follow every
live run (follow.py), record each end. It is the one place that changes a run's state (through `Job.transition`),
with what `tracking.final_outcome` decides; where several runners follow one run, the first to record its end wins.
Its tracked runs live in the registry (registry.py), which the views read.
"""

from __future__ import annotations

import logging
import secrets
import signal
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import anyio
import anyio.abc

from ..environment.process_env import worker_environment
from ..errors import StoreUnavailable
from .events import Event, MemorySample
from .follow import START_GRACE_S, Liveness, follow_events
from .jobs import FailureKind, Job, JobError, JobState
from .leases import SchedulerElection, read_lease
from .process import WorkerProcess, signal_group
from .registry import STATUS, RunRegistry, Tracked
from .run_log import disk_free, stderr_tail
from .stopping import stop_worker
from .store import RunStore
from .tracking import Ending, apply_event, final_outcome, last_checkpoint

log = logging.getLogger(__name__)
#: seconds between looks at the store for runs other runners accepted, started or cancelled
SYNC_S = 0.5
#: seconds the runner's own writes on the event loop wait for a lock another process holds (then retried later)
LOOP_LOCK_WAIT_S = 0.2
#: consecutive failed looks at a busy database before a warning (about 10 s at SYNC_S); the rest are debug lines
RETRIES_BEFORE_WARNING = 20
#: seconds progress updates are skipped after the database refused one
QUIET_SAVE_BACKOFF_S = 2.0


def _log_busy(exc: StoreUnavailable, failures: int) -> None:
    """A busy database is normal under load: a warning only once the retries add up to a real wait."""
    level = logging.WARNING if failures == RETRIES_BEFORE_WARNING else logging.DEBUG
    log.log(level, "%s; retrying every %.1f s (%d tries so far)", exc, SYNC_S, failures)


class Scheduler:
    """Started with `start(task_group)`; `wake()` after queueing a run."""

    def __init__(
        self, registry: RunRegistry, *, max_concurrent: int, cancel_grace_s: float, worker_env: Mapping[str, str]
    ) -> None:
        self.registry = registry
        self.store = registry.store
        self.max_concurrent = max_concurrent
        self.cancel_grace_s = cancel_grace_s
        self.worker_env = dict(worker_env)
        self.election = SchedulerElection(self.store, holder=secrets.token_hex(8))
        self._wake = anyio.Event()
        self._unsaved: dict[str, tuple[Tracked, JobState]] = {}  # ends the database refused, retried
        self._quiet_saves_resume_at = 0.0
        self._tg: anyio.abc.TaskGroup | None = None

    def start(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        self.sync()
        tg.start_soon(self.run)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Keep up with the store: start queued runs while this runner is the scheduler, follow every live run."""
        assert self._tg is not None
        failures = 0
        while True:
            try:  # a locked or full database stops nothing: runs go on in their workers, and this retries
                with self.store.lock_wait(LOOP_LOCK_WAIT_S):
                    self.schedule_once()
                failures = 0
            except StoreUnavailable as exc:
                failures += 1
                _log_busy(exc, failures)
            with anyio.move_on_after(SYNC_S):
                await self._wake.wait()
            self._wake = anyio.Event()

    def schedule_once(self) -> None:
        """One look at the store: record refused ends, and start what is queued while this runner schedules."""
        assert self._tg is not None
        self.sync()
        for tracked, before in list(self._unsaved.values()):
            self._record_end(tracked, before)
        if self.election.hold():
            while (job := self.store.claim_next(self.max_concurrent)) is not None:
                tracked = self.registry.track(job)
                tracked.job = job
                self.registry.touch(tracked, STATUS)
                tracked.following = True
                self._tg.start_soon(self._run_worker, tracked)

    def sync(self) -> None:
        """Track every live run in the store: new queued ones, and running ones nobody here follows yet (started by
        another runner, or left by a previous one); fail those whose worker is gone."""
        live = {job.id: job for job in self.store.live()}
        for run_id, stored in live.items():
            tracked = self.registry.live.get(run_id)
            if tracked is None:
                tracked = self.registry.track(stored)
            elif tracked.job.state.terminal and stored.attempt > tracked.job.attempt:  # resumed by another runner
                tracked = self.registry.replace(stored)
            elif tracked.job.state is JobState.QUEUED and stored.state is not JobState.QUEUED:
                tracked.job = stored  # another runner started it
                self.registry.touch(tracked, STATUS)
            if tracked.job.state is JobState.RUNNING and not tracked.following:
                self._adopt(tracked)
        for tracked in list(self.registry.live.values()):
            if tracked.job.state is JobState.QUEUED and tracked.job.id not in live:  # cancelled elsewhere
                tracked.job = self.store.get(tracked.job.id)
                tracked.done.set()
                self.registry.touch(tracked, STATUS)

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

    def _finish(self, tracked: Tracked, state: JobState, error: JobError | None = None) -> None:
        """Record the run's end, unless another runner following it recorded it first (then take theirs)."""
        before = tracked.job.state
        tracked.job.transition(state, error=error)
        self._record_end(tracked, before)
        tracked.done.set()
        self.registry.touch(tracked, STATUS)
        self._wake.set()  # a slot is free

    def _record_end(self, tracked: Tracked, before: JobState) -> None:
        """Write a run's end to the store; while the database cannot be written, keep it to retry (schedule_once)."""
        try:
            if not self.store.save(tracked.job, if_state=before):
                tracked.job = self.store.get(tracked.job.id)
            self._unsaved.pop(tracked.job.id, None)
        except StoreUnavailable as exc:
            log.warning("run %s ended %s, not recorded yet: %s", tracked.job.id, tracked.job.state.value, exc)
            self._unsaved[tracked.job.id] = (tracked, before)

    def _save_quietly(self, job: Job) -> None:
        """A progress update of the record, on the event loop: a brief lock wait, then skipped for a while once refused
        (a database another process holds locked must not stall every run and tool call); a later one writes it."""
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
                self.registry.touch(tracked, aspects)

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

    async def stop(self, tracked: Tracked) -> None:
        """Stop the run's worker once, however many ask; return once it ended. The stop runs in the runner's own task
        group: a caller that stops waiting (a cancelled request) leaves it going, SIGKILL included."""
        pid = tracked.worker.pid if tracked.worker else tracked.job.pid
        if pid is not None:  # else starting right now: _run_worker stops it once it has a process
            self._stop_once(tracked, pid)
        await tracked.done.wait()

    def _stop_once(self, tracked: Tracked, pid: int) -> None:
        assert self._tg is not None
        start_stop(self._tg, self.store, tracked, pid, self.cancel_grace_s)


def start_stop(tg: anyio.abc.TaskGroup, store: RunStore, tracked: Tracked, pid: int, grace_s: float) -> None:
    """The run's one stop (stopping.py), started unless one is under way."""
    if not tracked.stopping:
        tracked.stopping = True
        lease = partial(read_lease, store, tracked.job.id)
        tg.start_soon(stop_worker, pid, tracked.history.pace, grace_s, tracked.done, f"run {tracked.job.id}", lease)
