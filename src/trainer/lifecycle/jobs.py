"""The job state machine: states, failure kinds, the transition table and the one place state changes.

`Job.transition` is the only way a run's state changes; `JobRunner` calls it with what `tracking.final_outcome`
decides from the worker's last event and exit status.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from ..errors import InvalidTransition
from ..planning.config import QLoRAConfig


class JobState(StrEnum):
    #: accepted and waiting for a worker slot
    QUEUED = "queued"
    #: a worker process exists for it
    RUNNING = "running"
    #: the worker reported success and exited 0
    SUCCEEDED = "succeeded"
    #: the worker reported a failure, crashed, or was stopped by a guard
    FAILED = "failed"
    #: stopped at the user's request
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    # resume_run: the run's next attempt, from its newest checkpoint
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
}


class FailureKind(StrEnum):
    #: the config, dataset or model was rejected by the worker
    CONFIG = "config"
    #: the worker ran out of memory
    OOM = "oom"
    #: the worker's measured memory passed the run's budget
    MEMORY_BUDGET = "memory_budget"
    #: the loss became NaN or infinite (a learning rate or scale too large for the model)
    DIVERGED = "diverged"
    #: a checkpoint or the adapter could not be written (disk full, read-only folder); earlier checkpoints are intact
    STORAGE = "storage"
    #: the worker raised an unexpected error and reported it
    BACKEND = "backend"
    #: the worker died (signal or non-zero exit) without reporting why
    CRASHED = "crashed"
    #: the server shut down while the run trained; the worker saved its adapter and stopped
    INTERRUPTED = "interrupted"
    #: the server died while the run was live; nobody watched it finish
    ORPHANED = "orphaned"


class JobError(BaseModel):
    """Why a run failed."""

    model_config = ConfigDict(frozen=True)

    kind: FailureKind
    message: str
    exit_code: int | None = None
    stderr_tail: str | None = None


class Phase(StrEnum):
    LOADING_MODEL = "loading_model"
    LOADING_DATA = "loading_data"
    TRAINING = "training"
    EVALUATING = "evaluating"
    SAVING = "saving"


class RunMetrics(BaseModel):
    """Losses, speed and memory so far (GB)."""

    last_train_loss: float | None = None
    first_val_loss: float | None = None
    last_val_loss: float | None = None
    learning_rate: float | None = None
    iterations_per_second: float | None = None
    #: the last report's window (steps_per_report steps)
    tokens_per_second: float | None = None
    #: trained tokens over the time of the training steps (not evaluations or saves)
    average_tokens_per_second: float | None = None
    train_seconds: float = 0.0  # in training steps so far
    trained_tokens: int = 0
    peak_memory_gb: float | None = None
    #: a run of several processes: each rank's MLX peak, rank 0 first (the budget and prediction are per process)
    rank_peak_memory_gb: list[float] | None = None
    predicted_peak_gb: float | None = None
    #: dpo and orpo: the latest validation accuracy (chosen preferred) and margin
    last_val_accuracy: float | None = None
    last_val_margin: float | None = None
    #: grpo: the last report's mean reward and share of completions passing all tests; the same of the latest
    #: validation's greedy completions
    last_reward: float | None = None
    last_pass_rate: float | None = None
    last_val_reward: float | None = None
    last_val_pass_rate: float | None = None
    #: the first-steps check chose another plan (planning/replan.py): from which step, and why
    plan_change: str | None = None
    #: a packed run (engine/packing.py): its records, rows and how full the rows are
    packing: str | None = None


class RunSnapshot(BaseModel):
    """The frozen view of a run that leaves the trainer."""

    model_config = ConfigDict(frozen=True)

    id: str
    state: JobState
    phase: Phase | None
    iteration: int
    iters: int
    created_at: float
    started_at: float | None
    ended_at: float | None
    eta_seconds: float | None
    stalled_seconds: float | None = None  # the worker's heartbeat is this old: stopped or hung
    metrics: RunMetrics
    adapter_path: str | None
    run_dir: str
    error: JobError | None
    config: QLoRAConfig
    attempt: int = 1  # 2 and on: resumed (resume_run) from a checkpoint of the attempt before

    @property
    def progress_percent(self) -> float:
        return round(100.0 * self.iteration / self.iters, 1) if self.iters else 0.0

    def summary(self) -> str:
        """One line a person (or a model that reads only text) can follow a run by."""
        m = self.metrics
        phase = f" ({self.phase.value})" if self.phase and not self.state.terminal else ""
        parts = [f"run {self.id}: {self.state.value}{phase}", f"iteration {self.iteration}/{self.iters}"]
        if self.attempt > 1:
            parts.append(f"attempt {self.attempt}")
        if m.last_train_loss is not None:
            parts.append(f"train loss {m.last_train_loss:.3f}")
        if m.last_val_loss is not None:
            parts.append(f"val loss {m.first_val_loss:.3f} -> {m.last_val_loss:.3f}")
        if m.average_tokens_per_second and m.tokens_per_second:
            parts.append(f"{m.average_tokens_per_second:.0f} tok/s average ({m.tokens_per_second:.0f} last window)")
        elif m.tokens_per_second:
            parts.append(f"{m.tokens_per_second:.0f} tok/s")
        if self.stalled_seconds is not None:
            parts.append(f"STALLED: the worker has been silent for {self.stalled_seconds:.0f}s (stopped or hung?)")
        elif self.eta_seconds is not None:
            parts.append(f"ETA {self.eta_seconds:.0f}s")
        if m.rank_peak_memory_gb:
            parts.append("peak per process " + " / ".join(f"{p:.2f}" for p in m.rank_peak_memory_gb) + " GB")
        elif m.peak_memory_gb:
            parts.append(f"peak {m.peak_memory_gb:.2f} GB")
        if self.error:
            parts.append(f"error ({self.error.kind.value}): {self.error.message}")
        elif self.adapter_path and self.state is JobState.SUCCEEDED:
            parts.append(f"adapter {self.adapter_path}")
        return ", ".join(parts)


@dataclass
class Job:
    """The mutable record of one run; `transition` is the only way its state changes."""

    id: str
    config: QLoRAConfig
    run_dir: str
    iters: int
    state: JobState = JobState.QUEUED
    phase: Phase | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    iteration: int = 0
    pid: int | None = None
    adapter_path: str | None = None
    error: JobError | None = None
    metrics: RunMetrics = field(default_factory=lambda: RunMetrics())
    attempt: int = 1

    def transition(self, to: JobState, *, error: JobError | None = None) -> None:
        if to not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"run {self.id}: cannot go from {self.state} to {to}")
        now = time.time()
        self.state = to
        if to is JobState.QUEUED:  # resumed: a new attempt, with nothing of the last one's end
            self.attempt += 1
            self.started_at = self.ended_at = self.pid = self.error = self.phase = None
        if to is JobState.RUNNING:
            self.started_at = now
        if to.terminal:
            self.ended_at = now
            self.pid = None
        if to is JobState.SUCCEEDED:
            self.phase = None  # the last phase (saving) is over
        if to is JobState.FAILED:
            self.error = error or JobError(kind=FailureKind.CRASHED, message="failed for an unknown reason")

    def eta_seconds(self) -> float | None:
        its = self.metrics.iterations_per_second
        if self.state is not JobState.RUNNING or not its:
            return None
        return max(self.iters - self.iteration, 0) / its

    def snapshot(self, stalled_seconds: float | None = None) -> RunSnapshot:
        """What callers see; `stalled_seconds`: the age of a running worker's last heartbeat, when it is stale."""
        return RunSnapshot(
            id=self.id,
            state=self.state,
            phase=self.phase,
            iteration=self.iteration,
            iters=self.iters,
            created_at=self.created_at,
            started_at=self.started_at,
            ended_at=self.ended_at,
            eta_seconds=None if stalled_seconds is not None else self.eta_seconds(),
            stalled_seconds=stalled_seconds,
            metrics=self.metrics.model_copy(),
            adapter_path=self.adapter_path,
            run_dir=self.run_dir,
            error=self.error,
            config=self.config,
            attempt=self.attempt,
        )
