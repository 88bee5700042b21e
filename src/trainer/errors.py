"""The trainer's exception tree. Messages name the bad value and the fix.

TrainerError
 ├── ConfigError        a run config, dataset or model path is not usable
 ├── RunNotFound        no run with that id
 ├── RunConflict        the run is in a state that does not allow the request
 ├── ModelError         a model could not be loaded or used for generation
 ├── InvalidTransition  a job state change that the state machine forbids (a bug if raised)
 ├── KernelBuildError   the CPU decode kernels cannot be built here (decode falls back)
 ├── Diverged           a run's loss became NaN or infinite
 ├── CheckpointWriteError  a checkpoint could not be written (disk full, read-only)
 └── StoreUnavailable   the run database cannot be written now (locked by another process, disk full)
"""

from __future__ import annotations


class TrainerError(Exception):
    """Base class of every error the trainer raises on purpose."""


class ConfigError(TrainerError, ValueError):
    """A run config, dataset or model path is not usable."""


class RunNotFound(TrainerError, LookupError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with id {run_id!r}; call list_runs (or `python -m trainer list`) to see the ids")
        self.run_id = run_id


class RunConflict(TrainerError):
    """The run is in a state that does not allow the request."""


class ModelError(TrainerError):
    """A model could not be loaded or used."""


class InvalidTransition(TrainerError):
    """A state change that TRANSITIONS forbids."""


class KernelBuildError(TrainerError):
    """The CPU decode kernels could not be built here; the message says why and what to install."""


class Diverged(TrainerError):
    """A run's loss became NaN or infinite; the message names the step and what to lower."""


class CheckpointWriteError(TrainerError):
    """A checkpoint or adapter could not be written (disk full, read-only folder); the message names the path and
    says what was being written. The previous checkpoints are untouched."""


class StoreUnavailable(TrainerError):
    """The run database could not be written (locked by another process past the timeout, disk full, read-only);
    nothing was changed. Background work retries; a tool call answers with this message."""
