"""Events -> run state: a pure reducer over one run's record, and the decision of how a run ended.

Nothing here does I/O or changes `Job.state`: `apply_event` folds what a worker reports into the record and its
history and says which aspects of the run changed; `final_outcome` is where a run's final state is decided, from the
worker's last event and exit status (the parent decides, as in rq). `JobRunner` applies both.
"""

from __future__ import annotations

import signal
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from .checkpoints import checkpoints_dir
from .events import (
    Checkpoint,
    Event,
    Failed,
    Finished,
    MemorySample,
    Packed,
    PhaseChanged,
    Progress,
    Replanned,
    Resumed,
    Stopped,
    TrainReport,
    ValReport,
)
from .jobs import FailureKind, Job, JobError, JobState
from .stopping import StopPace

#: a filesystem with less free space than this is full, as far as a worker that must write its events is concerned
DISK_FULL_BYTES = 1 << 20
#: memory samples kept per run in memory (at 0.5 s, the last 16 minutes); events.jsonl keeps them all
MEMORY_RING = 2000


class RunAspect(StrEnum):
    """What about a run changed; each is one resource (runs://{run_id}/{aspect})."""

    STATUS = "status"
    MEMORY = "memory"
    METRICS = "metrics"


@dataclass
class RunHistory:
    """What a run's events say beyond its record: the memory samples and every report."""

    memory: deque[MemorySample] = field(default_factory=lambda: deque(maxlen=MEMORY_RING))
    train_reports: list[TrainReport] = field(default_factory=list)
    val_reports: list[ValReport] = field(default_factory=list)
    pace: StopPace = field(default_factory=StopPace)  # what a stop of the run waits for


_STATUS = frozenset({RunAspect.STATUS})
_MEMORY = frozenset({RunAspect.MEMORY, RunAspect.STATUS})  # the status shows the latest samples
_METRICS = frozenset({RunAspect.METRICS, RunAspect.STATUS})


def apply_event(job: Job, history: RunHistory, event: Event) -> frozenset[RunAspect]:
    """Fold one event into the run's record and history; returns the aspects it changed."""
    metrics = job.metrics
    history.pace.observe(event)
    if isinstance(event, MemorySample):
        history.memory.append(event)
        metrics.peak_memory_gb = max(metrics.peak_memory_gb or 0.0, event.peak_gb)
        processes = job.config.num_processes
        if processes > 1 and event.rank < processes:
            peaks = list(metrics.rank_peak_memory_gb or [0.0] * processes)
            peaks[event.rank] = max(peaks[event.rank], event.peak_gb)
            metrics.rank_peak_memory_gb = peaks
        return _MEMORY
    if isinstance(event, TrainReport):
        history.train_reports.append(event)
        job.iteration = max(job.iteration, event.iteration)
        metrics.last_train_loss = event.train_loss
        metrics.learning_rate = event.learning_rate
        metrics.iterations_per_second = event.iterations_per_second
        metrics.tokens_per_second = event.tokens_per_second
        window = event.trained_tokens - metrics.trained_tokens  # tokens since the last report, at its speed
        if window > 0 and event.tokens_per_second > 0:
            metrics.train_seconds += window / event.tokens_per_second
            metrics.average_tokens_per_second = round(event.trained_tokens / metrics.train_seconds, 1)
        metrics.trained_tokens = event.trained_tokens
        metrics.peak_memory_gb = max(metrics.peak_memory_gb or 0.0, event.peak_memory)
        if event.reward is not None:
            metrics.last_reward, metrics.last_pass_rate = event.reward, event.pass_rate
        return _METRICS
    if isinstance(event, ValReport):
        history.val_reports.append(event)
        if metrics.first_val_loss is None:
            metrics.first_val_loss = event.val_loss
        metrics.last_val_loss = event.val_loss
        if event.val_accuracy is not None:
            metrics.last_val_accuracy, metrics.last_val_margin = event.val_accuracy, event.val_margin
        if event.val_reward is not None:
            metrics.last_val_reward, metrics.last_val_pass_rate = event.val_reward, event.val_pass_rate
        return _METRICS
    if isinstance(event, Progress):
        job.iteration = max(job.iteration, event.iteration)
    elif isinstance(event, PhaseChanged):
        job.phase = event.phase
    elif isinstance(event, Failed | Stopped):
        job.adapter_path = event.adapter_path or job.adapter_path
    elif isinstance(event, Checkpoint):
        job.adapter_path = event.adapter_dir or str(Path(event.path).parent)
    elif isinstance(event, Resumed):  # steps after the checkpoint are trained again: their old reports are void
        job.iteration = event.iteration
        history.train_reports[:] = [r for r in history.train_reports if r.iteration <= event.iteration]
        history.val_reports[:] = [r for r in history.val_reports if r.iteration < event.iteration]
        return _METRICS
    elif isinstance(event, Finished):
        job.adapter_path = event.adapter_path
    elif isinstance(event, Replanned):
        metrics.plan_change = f"from step {event.iteration + 1}: {event.reason}"
        metrics.predicted_peak_gb = event.new_predicted_gb
        return _METRICS
    elif isinstance(event, Packed):
        metrics.packing = (
            f"{event.records} records in {event.rows} rows of {event.width} tokens, {event.filled:.1%} full"
        )
        return _METRICS
    else:  # Started, Stopping: nothing a reader of the run sees changes
        return frozenset()
    return _STATUS


@dataclass(frozen=True)
class Ending:
    """How the worker's life ended, as the runner saw it."""

    last_event: Event | None  # the worker's Finished, Failed or Stopped, if it sent one
    exit_code: int | None  # None: not this server's child, so its exit status is unknown
    cancel_requested: bool = False
    shutting_down: bool = False
    stderr_tail: str = ""
    disk_free_bytes: int | None = None  # on the run folder's filesystem, when the worker ended


def final_outcome(job: Job, ending: Ending) -> tuple[JobState, JobError | None]:
    """The run's final state: success needs a Finished event and a clean exit (0, or unknown for a worker another
    server started); otherwise a cancel, a shutdown, the worker's own report, or a crash."""
    last, code = ending.last_event, ending.exit_code
    if isinstance(last, Finished) and code in (0, None):
        return JobState.SUCCEEDED, None
    if ending.cancel_requested:
        return JobState.CANCELLED, None
    where = job.adapter_path or job.config.adapter_dir or str(Path(job.run_dir) / "adapters")
    if ending.shutting_down:
        message = f"the server shut down at iteration {job.iteration}; the adapter so far is in {where}; "
        message += last_checkpoint(job)
        return JobState.FAILED, JobError(kind=FailureKind.INTERRUPTED, message=message, exit_code=code)
    if isinstance(last, Failed):
        return JobState.FAILED, JobError(
            kind=last.kind, message=last.message, exit_code=code, stderr_tail=ending.stderr_tail
        )
    if isinstance(last, Stopped):
        message = (
            f"the worker was stopped by a SIGTERM that was not a cancel (the machine shutting down?) at iteration "
            f"{job.iteration}; the adapter so far is in {where}; {last_checkpoint(job)}"
        )
        return JobState.FAILED, JobError(kind=FailureKind.INTERRUPTED, message=message, exit_code=code)
    if ending.disk_free_bytes is not None and ending.disk_free_bytes < DISK_FULL_BYTES:
        message = (
            f"the worker ended without reporting a result while the disk holding {job.run_dir} was full "
            f"({ending.disk_free_bytes} bytes free): it could not write its events or checkpoints; free space, then "
            f"{last_checkpoint(job)}"
        )
        return JobState.FAILED, JobError(kind=FailureKind.STORAGE, message=message, exit_code=code)
    crash = crash_error(code, Path(job.run_dir), ending.stderr_tail)
    return JobState.FAILED, crash.model_copy(update={"message": f"{crash.message}; {last_checkpoint(job)}"})


def describe_exit(code: int) -> str:
    """How a process ended, in words for an error message."""
    if code >= 0:
        return f"exited with status {code}"
    how = f"was killed by signal {signal.Signals(-code).name}"
    if -code == signal.SIGKILL:
        how += " (often the kernel's out-of-memory killer; check the memory samples)"
    return how


def crash_error(exit_code: int | None, run_dir: Path, stderr_tail: str) -> JobError:
    if exit_code is None:
        how = "died without reporting a result (another server started it, so its exit status is unknown)"
    else:
        how = describe_exit(exit_code) + ("" if exit_code < 0 else " without reporting a result")
    return JobError(
        kind=FailureKind.CRASHED,
        message=f"the worker {how}; see {run_dir / 'worker.log'}",
        exit_code=exit_code,
        stderr_tail=stderr_tail,
    )


def last_checkpoint(job: Job) -> str:
    """Where the run's newest checkpoint is, in words for an error message (resume_run verifies it)."""
    numbered = sorted(checkpoints_dir(Path(job.run_dir)).glob("[0-9]" * 7))
    if numbered:
        return f"its last checkpoint is {numbered[-1]} (step {int(numbered[-1].name)}); resume_run continues from it"
    folder = Path(job.config.adapter_dir or Path(job.run_dir) / "adapters")
    if (folder / "adapters.safetensors").is_file():
        return f"its last adapter is in {folder}"
    return "it saved no checkpoint (resume_run starts it again from step 0)"
