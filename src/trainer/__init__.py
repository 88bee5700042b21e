"""Local QLoRA fine-tuning with MLX-LM: configs, a job runner with worker subprocesses, a run store, memory.

Usable without MCP (`python -m trainer` is its command line). `__all__` is the API the MCP layer uses: a
`JobRunner` over a `RunStore` (submit, get, wait, cancel, list), `predict_run` / `predict_model`, and a
`ModelSession` for generation. Importing this package, preparing and submitting runs never imports MLX; a model
session or a worker does. The layers below (docs/architecture.md): `planning` and `lifecycle` import no MLX,
`engine` is everything that does, `environment` sets up the processes MLX runs in.
"""

from .engine.inference import Generation, ModelInfo, ModelSession
from .environment.mlx_env import use_mlx_env
from .environment.preload import reexec_with_preloads
from .errors import (
    CheckpointWriteError,
    ConfigError,
    InvalidTransition,
    ModelError,
    RunConflict,
    RunNotFound,
    StoreUnavailable,
    TrainerError,
)
from .lifecycle.cues import RunUpdate
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
from .lifecycle.memory import ProcessMemory, WorkerMemory, process_memory, sample_memory
from .lifecycle.plot import render_run_plot
from .lifecycle.runner import JobRunner
from .lifecycle.store import RunStore
from .lifecycle.tracking import RunAspect
from .planning.config import QLoRAConfig, describe_validation_error
from .planning.memory_estimate import MemoryParts, MemoryPlan
from .planning.predict import RunPrediction, predict_model, predict_run
from .planning.preflight import PreparedRun, RunDefaults, prepare_run
from .settings import DEFAULT_SAMPLE_INTERVAL_S, HOME_ENV, default_budget_gb, default_home

__all__ = [
    "DEFAULT_SAMPLE_INTERVAL_S",
    "HOME_ENV",
    "Checkpoint",
    "CheckpointWriteError",
    "ConfigError",
    "Event",
    "Failed",
    "FailureKind",
    "Finished",
    "Generation",
    "InvalidTransition",
    "JobError",
    "JobRunner",
    "JobState",
    "MemoryParts",
    "MemoryPlan",
    "MemorySample",
    "ModelError",
    "ModelInfo",
    "ModelSession",
    "Phase",
    "PhaseChanged",
    "PreparedRun",
    "ProcessMemory",
    "Progress",
    "QLoRAConfig",
    "RunAspect",
    "RunConflict",
    "RunDefaults",
    "RunMetrics",
    "RunNotFound",
    "RunPrediction",
    "RunSnapshot",
    "RunStore",
    "RunUpdate",
    "StoreUnavailable",
    "TrainReport",
    "TrainerError",
    "ValReport",
    "WorkerMemory",
    "default_budget_gb",
    "default_home",
    "describe_validation_error",
    "predict_model",
    "predict_run",
    "prepare_run",
    "process_memory",
    "render_run_plot",
    "reexec_with_preloads",
    "sample_memory",
    "use_mlx_env",
]
