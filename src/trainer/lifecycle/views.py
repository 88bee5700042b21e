"""The runner's read side: a run's record, history and liveness as callers see them, and waiting for changes.

It answers from the registry (registry.py), which the scheduler keeps current, and from the store.
"""

from __future__ import annotations

import time
from typing import Literal

import anyio

from ..errors import RunConflict
from . import leases
from .events import MemorySample, TrainReport, ValReport
from .jobs import JobState, RunSnapshot
from .leases import process_started, read_lease
from .memory import WorkerMemory, workers_memory
from .registry import RunRegistry, Tracked

#: after a change, how long a long-poll keeps gathering the changes that follow it
SETTLE_S = 2.0


#: what a follower can wait for: any milestone (state, phase, a report, an error), or only some of them; each wait
#: also ends on an error, the run's end, or a stall (the worker silent past leases.STALE_S)
WaitFor = Literal["change", "end", "phase", "validation"]
#: how often a wait looks for a stall (the worker's lease is a file, not an event)
STALL_CHECK_S = 5.0


def _milestone(tracked: Tracked, until: WaitFor = "change") -> tuple[object, ...]:
    """What a follower wants to be woken for: not every iteration or memory sample."""
    job, history = tracked.job, tracked.history
    common = (job.state.terminal, job.error is not None)
    if until == "end":
        return common
    if until == "phase":
        return (*common, job.state, job.phase)
    if until == "validation":
        return (*common, job.state, len(history.val_reports))
    return (job.state, job.phase, len(history.train_reports), len(history.val_reports), job.error is not None)


class RunViews:
    """Read-only answers about runs, over the registry's tracked runs and the store."""

    def __init__(self, registry: RunRegistry) -> None:
        self.registry = registry
        self.store = registry.store

    def get(self, run_id: str) -> RunSnapshot:
        """The run as this runner sees it, or as the store records it where that is further along (another runner
        started it, or recorded its end first); a running run whose worker went silent says for how long."""
        tracked = self.registry.live.get(run_id)
        if tracked is not None and tracked.job.state is JobState.RUNNING:
            stored = self.store.get(run_id)
            if stored.state.terminal:
                return stored.snapshot()
            lease = read_lease(self.store, run_id)
            age = time.time() - lease.heartbeat if lease else 0.0
            return tracked.job.snapshot(stalled_seconds=round(age, 1) if age > leases.STALE_S else None)
        ended_here = tracked is not None and tracked.job.state.terminal
        return (tracked.job if tracked is not None and ended_here else self.store.get(run_id)).snapshot()

    def list_runs(self, state: JobState | None = None, limit: int = 50) -> list[RunSnapshot]:
        return [
            self.registry.live[j.id].job.snapshot() if j.id in self.registry.live else j.snapshot()
            for j in self.store.list_runs(state, limit)
        ]

    def memory_samples(self, run_id: str, limit: int | None = None) -> list[MemorySample]:
        """The run's latest memory samples, oldest first: `limit` of them (0: none), or all that are kept."""
        samples = list(self.registry.get(run_id).history.memory)
        if limit is None:
            return samples
        return samples[-limit:] if limit > 0 else []

    def latest_memory(self, run_id: str, per_process: int) -> list[MemorySample]:
        """The latest `per_process` samples of each of the run's processes (rank 0's carry the others' too)."""
        return self.memory_samples(run_id, per_process * self.get(run_id).config.num_processes)

    def reports(self, run_id: str) -> tuple[list[TrainReport], list[ValReport]]:
        history = self.registry.get(run_id).history
        return list(history.train_reports), list(history.val_reports)

    def queue_position(self, run_id: str) -> int:
        """0 when the run is not waiting; n when n runs (running, or queued before it) start before it."""
        before = self.store.queued_before(run_id)
        return 0 if before is None else before + self.store.count(JobState.RUNNING)

    def live_workers(self) -> dict[str, int]:
        """run id -> worker pid, for every run being trained now (by a worker of this runner or another's)."""
        workers = {}
        for run_id, tracked in self.registry.live.items():
            if tracked.job.state is JobState.RUNNING and not tracked.done.is_set():
                pid = tracked.worker.pid if tracked.worker else tracked.job.pid
                if pid is not None and process_started(pid) is not None:
                    workers[run_id] = pid
        return workers

    def worker_memory(self) -> list[WorkerMemory]:
        """Each live worker's RSS now and its latest MLX numbers (MLX's allocator is only readable from inside)."""
        found = workers_memory({rid: (pid, self.memory_samples(rid, 1)) for rid, pid in self.live_workers().items()})
        for worker in found:  # a run of several processes: its other ranks' peaks too (their pids stay in rank 0)
            worker.rank_peaks_gb = self.registry.get(worker.run_id).job.metrics.rank_peak_memory_gb
        return found

    def adapter_for(self, run_id: str) -> tuple[str, str]:
        """The run's base model and adapter folder, for generating through it; RunConflict if it has none yet."""
        snap = self.get(run_id)
        if not snap.adapter_path:
            raise RunConflict(
                f"run {run_id} has no adapter yet (it is {snap.state.value}); wait until it has saved a checkpoint "
                "or succeeded (run_status shows adapter_path)"
            )
        return snap.config.model, snap.adapter_path

    async def wait_for_change(self, run_id: str, timeout: float, until: WaitFor = "change") -> RunSnapshot:
        """Return when something worth a look happens (by default: the state or phase changes, a train or
        validation report arrives, an error; `until` narrows it), the worker stalls, or after `timeout` seconds;
        changes within SETTLE_S of the first come in one answer."""
        tracked = self.registry.get(run_id)
        before = _milestone(tracked, until)
        with anyio.move_on_after(timeout):
            while _milestone(tracked, until) == before and not tracked.job.state.terminal:
                woke = False
                with anyio.move_on_after(STALL_CHECK_S):
                    await tracked.changed.wait()
                    woke = True
                if not woke and self.get(run_id).stalled_seconds is not None:  # quiet for a while: is it stuck?
                    break
        if _milestone(tracked, until) != before and not tracked.job.state.terminal:
            with anyio.move_on_after(min(SETTLE_S, timeout)):  # a burst (loading, evaluating, a report) as one
                while not tracked.job.state.terminal:
                    await tracked.changed.wait()
        return tracked.job.snapshot()

    async def wait_until_done(self, run_id: str, timeout: float | None = None) -> RunSnapshot:
        tracked = self.registry.get(run_id)
        with anyio.fail_after(timeout):
            while not tracked.job.state.terminal:
                await tracked.changed.wait()
        return tracked.job.snapshot()
