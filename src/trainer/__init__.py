"""Local QLoRA fine-tuning with MLX-LM: configs, a job runner with worker subprocesses, a run store, memory.

Usable without MCP; `python -m trainer` is its command line.
"""

from .config import QLoRAConfig
from .errors import ConfigError, InvalidTransition, ModelError, RunConflict, RunNotFound, TrainerError
from .events import Checkpoint, Event, Failed, Finished, MemorySample, PhaseChanged, Progress, TrainReport, ValReport
from .jobs import FailureKind, JobError, JobState, Phase, RunMetrics, RunSnapshot
from .memory import sample_memory
from .runner import JobRunner, RunUpdate
from .store import RunStore

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
