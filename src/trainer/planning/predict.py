"""Memory predictions without starting anything: for a whole run config, or for a model plus a few settings."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ..errors import ConfigError
from .config import QLoRAConfig
from .memory_estimate import MemoryParts, MemoryPlan
from .memory_plan import check_memory
from .modelref import read_model_config, resolve_model_dir
from .plan_search import PlanOption
from .preflight import RunDefaults, prepare_run


class RunPrediction(BaseModel):
    """A training run's predicted peak memory, part by part, against its budget."""

    model: str
    prediction: MemoryParts
    plan: MemoryPlan
    budget_gb: float
    fits: bool
    changes: list[str] = Field(description="Settings fit_to_budget would change.")
    choice: str | None = Field(None, description="Over budget: the fastest plan that fits, and why.")
    plans: list[PlanOption] = Field(default_factory=list, description="Over budget: the plans considered.")
    num_processes: int = Field(1, description="The prediction and the budget are each process's.")


def predict_run(config: QLoRAConfig, defaults: RunDefaults | None = None) -> RunPrediction:
    """The prediction `start_qlora_run` would make for this config (reading its dataset), never refused."""
    prepared = prepare_run(config.model_copy(update={"allow_over_budget": True}), defaults)
    if prepared.memory is None:
        raise ConfigError(f"cannot predict memory for {config.model!r}: its config.json lacks the model dimensions")
    processes = prepared.config.num_processes  # a hostfile's machines are counted by now
    return RunPrediction(model=prepared.config.model, num_processes=processes, **prepared.memory.model_dump())


def predict_model(model: str, settings: dict[str, Any], defaults: RunDefaults | None = None) -> RunPrediction:
    """The prediction for `model` with run settings (batch_size, max_seq_length, ...) and no dataset."""
    defaults = defaults or RunDefaults()
    model_dir = resolve_model_dir(model, defaults.models(), defaults.path_policy())
    model_config = read_model_config(model_dir)
    config = QLoRAConfig.parse({**settings, "model": str(model_dir), "data": str(model_dir), "allow_over_budget": True})
    try:
        _, memory = check_memory(config, model_config, defaults.budget_gb(), longest_tokens=None)
    except KeyError as missing:
        raise ConfigError(f"cannot predict memory for {model!r}: its config.json lacks {missing}") from None
    return RunPrediction(model=str(model_dir), **memory.model_dump())
