"""Local QLoRA fine-tuning with MLX-LM: configs, a job runner with worker subprocesses, a run store, memory.

Usable without MCP; `python -m trainer` is its command line.
"""

from .errors import ConfigError, InvalidTransition, ModelError, RunConflict, RunNotFound, TrainerError
from .lifecycle.events import (
    Checkpoint,
    Event,
    Failed,
    Finished,
    MemorySample,
    PhaseChanged,
    Progress,
    TrainReport,
    ValReport,
)
from .lifecycle.jobs import FailureKind, JobError, JobState, Phase, RunMetrics, RunSnapshot
from .lifecycle.memory import sample_memory
from .lifecycle.runner import JobRunner, RunUpdate
from .lifecycle.store import RunStore
from .planning.config import QLoRAConfig

__all__ = [
    "Checkpoint",
    "ConfigError",
    "Event",
    "Failed",
    "FailureKind",
    "Finished",
    "InvalidTransition",
    "JobError",
    "JobRunner",
    "JobState",
    "MemorySample",
    "ModelError",
    "Phase",
    "PhaseChanged",
    "Progress",
    "QLoRAConfig",
    "RunConflict",
    "RunMetrics",
    "RunNotFound",
    "RunSnapshot",
    "RunStore",
    "RunUpdate",
    "TrainReport",
    "TrainerError",
    "ValReport",
    "sample_memory",
]
