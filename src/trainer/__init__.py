"""Local QLoRA fine-tuning with MLX-LM: configs, a job runner with worker subprocesses, a run store, memory.

Usable without MCP (`python -m trainer` is its command line). `__all__` is the API the MCP layer uses: a
`JobRunner` over a `RunStore` (submit, get, wait, cancel, list), `predict_run` / `predict_model`, and a
`ModelSession` for generation. Importing this package, preparing and submitting runs never imports MLX; a model
session or a worker does. The layers below (docs/architecture.md): `planning` and `lifecycle` import no MLX,
`engine` is everything that does, `environment` sets up the processes MLX runs in.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# transformers says "PyTorch was not found" on import; MLX does the work here and its tokenizers need no PyTorch
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

if TYPE_CHECKING:
    from .engine.decode_kernel import build_in_background as build_decode_kernel_in_background
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
    from .lifecycle.deletion import DeletedRun
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
    from .lifecycle.views import WaitFor
    from .planning.config import QLoRAConfig, describe_validation_error
    from .planning.dataset_report import DatasetReport, validate_dataset
    from .planning.memory_estimate import MemoryParts, MemoryPlan
    from .planning.model_inventory import StoredModel, hub_cached_models, imported_models
    from .planning.predict import RunPrediction, predict_model, predict_run
    from .planning.preflight import PreparedRun, RunDefaults, prepare_run
    from .planning.repo_dataset import BuildReport, build_dataset
    from .results.evaluation import Evaluation, evaluation_spec, run_evaluation, stored_evaluation
    from .results.evaluation_jobs import EvaluationState, evaluation_state, start_evaluation
    from .results.exports import ExportedModel, export_inputs, export_model
    from .settings import DEFAULT_SAMPLE_INTERVAL_S, HOME_ENV, default_budget_gb, default_home

# name -> (module, attribute): imported on first use, so that `python -m mcp_local` and the CLI can re-execute
# themselves with the preloads (environment/preload.py) before anything heavy is imported
_LAZY = {
    "Checkpoint": (".lifecycle.events", "Checkpoint"),
    "CheckpointWriteError": (".errors", "CheckpointWriteError"),
    "ConfigError": (".errors", "ConfigError"),
    "DEFAULT_SAMPLE_INTERVAL_S": (".settings", "DEFAULT_SAMPLE_INTERVAL_S"),
    "DatasetReport": (".planning.dataset_report", "DatasetReport"),
    "BuildReport": (".planning.repo_dataset", "BuildReport"),
    "build_dataset": (".planning.repo_dataset", "build_dataset"),
    "DeletedRun": (".lifecycle.deletion", "DeletedRun"),
    "Event": (".lifecycle.events", "Event"),
    "Failed": (".lifecycle.events", "Failed"),
    "Evaluation": (".results.evaluation", "Evaluation"),
    "EvaluationState": (".results.evaluation_jobs", "EvaluationState"),
    "ExportedModel": (".results.exports", "ExportedModel"),
    "FailureKind": (".lifecycle.jobs", "FailureKind"),
    "Finished": (".lifecycle.events", "Finished"),
    "Generation": (".engine.inference", "Generation"),
    "HOME_ENV": (".settings", "HOME_ENV"),
    "InvalidTransition": (".errors", "InvalidTransition"),
    "JobError": (".lifecycle.jobs", "JobError"),
    "JobRunner": (".lifecycle.runner", "JobRunner"),
    "JobState": (".lifecycle.jobs", "JobState"),
    "WaitFor": (".lifecycle.views", "WaitFor"),
    "MemoryParts": (".planning.memory_estimate", "MemoryParts"),
    "MemoryPlan": (".planning.memory_estimate", "MemoryPlan"),
    "MemorySample": (".lifecycle.events", "MemorySample"),
    "ModelError": (".errors", "ModelError"),
    "ModelInfo": (".engine.inference", "ModelInfo"),
    "ModelSession": (".engine.inference", "ModelSession"),
    "Phase": (".lifecycle.jobs", "Phase"),
    "PhaseChanged": (".lifecycle.events", "PhaseChanged"),
    "PreparedRun": (".planning.preflight", "PreparedRun"),
    "ProcessMemory": (".lifecycle.memory", "ProcessMemory"),
    "Progress": (".lifecycle.events", "Progress"),
    "QLoRAConfig": (".planning.config", "QLoRAConfig"),
    "RunAspect": (".lifecycle.tracking", "RunAspect"),
    "RunConflict": (".errors", "RunConflict"),
    "RunDefaults": (".planning.preflight", "RunDefaults"),
    "RunMetrics": (".lifecycle.jobs", "RunMetrics"),
    "RunNotFound": (".errors", "RunNotFound"),
    "RunPrediction": (".planning.predict", "RunPrediction"),
    "RunSnapshot": (".lifecycle.jobs", "RunSnapshot"),
    "RunStore": (".lifecycle.store", "RunStore"),
    "RunUpdate": (".lifecycle.cues", "RunUpdate"),
    "StoreUnavailable": (".errors", "StoreUnavailable"),
    "StoredModel": (".planning.model_inventory", "StoredModel"),
    "TrainReport": (".lifecycle.events", "TrainReport"),
    "TrainerError": (".errors", "TrainerError"),
    "ValReport": (".lifecycle.events", "ValReport"),
    "WorkerMemory": (".lifecycle.memory", "WorkerMemory"),
    "build_decode_kernel_in_background": (".engine.decode_kernel", "build_in_background"),
    "default_budget_gb": (".settings", "default_budget_gb"),
    "default_home": (".settings", "default_home"),
    "describe_validation_error": (".planning.config", "describe_validation_error"),
    "evaluation_spec": (".results.evaluation", "evaluation_spec"),
    "evaluation_state": (".results.evaluation_jobs", "evaluation_state"),
    "start_evaluation": (".results.evaluation_jobs", "start_evaluation"),
    "export_inputs": (".results.exports", "export_inputs"),
    "export_model": (".results.exports", "export_model"),
    "hub_cached_models": (".planning.model_inventory", "hub_cached_models"),
    "imported_models": (".planning.model_inventory", "imported_models"),
    "predict_model": (".planning.predict", "predict_model"),
    "predict_run": (".planning.predict", "predict_run"),
    "prepare_run": (".planning.preflight", "prepare_run"),
    "process_memory": (".lifecycle.memory", "process_memory"),
    "reexec_with_preloads": (".environment.preload", "reexec_with_preloads"),
    "render_run_plot": (".lifecycle.plot", "render_run_plot"),
    "sample_memory": (".lifecycle.memory", "sample_memory"),
    "run_evaluation": (".results.evaluation", "run_evaluation"),
    "stored_evaluation": (".results.evaluation", "stored_evaluation"),
    "use_mlx_env": (".environment.mlx_env", "use_mlx_env"),
    "validate_dataset": (".planning.dataset_report", "validate_dataset"),
}

__all__ = [
    "BuildReport",
    "build_dataset",
    "DEFAULT_SAMPLE_INTERVAL_S",
    "DatasetReport",
    "validate_dataset",
    "Evaluation",
    "ExportedModel",
    "evaluation_spec",
    "EvaluationState",
    "evaluation_state",
    "start_evaluation",
    "export_inputs",
    "run_evaluation",
    "stored_evaluation",
    "export_model",
    "HOME_ENV",
    "Checkpoint",
    "DeletedRun",
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
    "WaitFor",
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
    "StoredModel",
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
    "build_decode_kernel_in_background",
    "process_memory",
    "render_run_plot",
    "hub_cached_models",
    "imported_models",
    "reexec_with_preloads",
    "sample_memory",
    "use_mlx_env",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value
    return value
