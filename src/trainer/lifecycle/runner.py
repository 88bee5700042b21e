"""The job runner: accepts runs, queues them in the store, trains each in a worker process, keeps records current.

Runs belong to the store, not to a runner: the queue is the store's queued runs, started oldest first by whichever
runner on the home holds the scheduler row (leases.py), and every runner follows every live run (follow.py), so a
runner that starts on a home adopts the runs a previous one left training. With `detach=True` (the MCP server)
workers outlive the runner; with `detach=False` (the CLI) leaving the runner stops them. The runner wires three
parts: the registry of tracked runs (registry.py), the scheduler that writes them (scheduler.py: the one place a
run's state changes) and the views that read them (views.py, which this class extends). Watchers get `RunUpdate`
cues naming what changed.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream

from ..errors import ConfigError, RunConflict, StoreUnavailable
from ..planning.config import QLoRAConfig
from ..planning.preflight import PreparedRun, RunDefaults, prepare_run
from .admission import admit
from .cues import RunUpdate
from .deletion import DeletedRun, delete_run
from .jobs import Job, JobState, RunSnapshot
from .registry import STATUS, RunRegistry
from .resume import ResumePlan, plan_resume
from .scheduler import Scheduler
from .store import RunStore
from .views import RunViews

log = logging.getLogger(__name__)


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
        super().__init__(RunRegistry(store))
        self.defaults = defaults or RunDefaults.for_home(store.root)
        self.detach = detach
        self.scheduler = Scheduler(
            self.registry, max_concurrent=max_concurrent, cancel_grace_s=cancel_grace_s, worker_env=worker_env or {}
        )
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> JobRunner:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self.scheduler.start(self._tg)
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        assert self._tg is not None
        with anyio.CancelScope(shield=True):
            if not self.detach:
                for tracked in list(self.registry.live.values()):
                    if tracked.worker is not None and not tracked.done.is_set():
                        tracked.shutting_down = True
                        await self.scheduler.stop(tracked)
            with suppress(StoreUnavailable):  # the row goes stale and the next server takes it anyway
                self.scheduler.election.release()
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(*exc)  # type: ignore[arg-type]

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
        self.store.create(job, prepared.model_dump_json(indent=2, exclude={"config"}))  # the config is the record's
        self.registry.track(job)
        self.scheduler.wake()
        return job.snapshot()

    async def resume(self, run_id: str, force: bool = False) -> tuple[RunSnapshot, ResumePlan]:
        """Queue a run that ended (failed or cancelled) again, as its next attempt, to continue from its newest
        checkpoint that verifies. RunConflict for a run that is live or succeeded; ConfigError when its data or model
        changed since that checkpoint (unless `force`) or the queue is full."""
        plan = await anyio.to_thread.run_sync(plan_resume, self.registry.get(run_id).job, force)
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
        self.registry.replace(job)
        self.scheduler.wake()
        log.info("%s (attempt %d)", plan.describe(), job.attempt)
        return job.snapshot(), plan

    async def delete(self, run_id: str) -> DeletedRun:
        """Delete an ended run's record, folder and the adapter files it wrote (refused while it is live)."""
        deleted = await anyio.to_thread.run_sync(delete_run, self.store, run_id)
        self.registry.forget(run_id)
        return deleted

    async def cancel(self, run_id: str) -> RunSnapshot:
        """Cancel a queued run at once, or stop a running one (SIGTERM, then SIGKILL) and wait until it is gone."""
        tracked = self.registry.get(run_id)
        job = tracked.job
        if job.state.terminal:
            raise RunConflict(f"run {run_id} already ended ({job.state.value}); there is nothing to cancel")
        if job.state is JobState.QUEUED:
            job.transition(JobState.CANCELLED)
            if self.store.save(job, if_state=JobState.QUEUED):
                tracked.done.set()
                self.registry.touch(tracked, STATUS)
                return job.snapshot()
            tracked.job = self.store.get(run_id)  # it started meanwhile: stop its worker instead
            self.scheduler.sync()
        self.store.request_cancel(run_id)
        tracked.cancel_requested = True
        await self.scheduler.stop(tracked)
        return tracked.job.snapshot()

    def watch(self, buffer: int = 256) -> AbstractAsyncContextManager[MemoryObjectReceiveStream[RunUpdate]]:
        """A stream of cues about every run; slow watchers miss cues rather than slow the runner."""
        return self.registry.cues.watch(buffer)
