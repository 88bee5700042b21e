"""profile_memory's predictions: a run config or a model plus settings, against the server's budget."""

from __future__ import annotations

from typing import Any

from trainer import ConfigError, QLoRAConfig
from trainer.planning.memory_plan import check_memory, default_budget_gb
from trainer.planning.modelref import read_model_config, resolve_model_dir
from trainer.planning.preflight import preflight

from .schemas import RunPrediction
from .state import AppState


def _budget(state: AppState) -> float:
    return state.settings.memory_budget_gb or default_budget_gb()


def predict_for_config(state: AppState, config: QLoRAConfig) -> RunPrediction:
    checked, _, memory = preflight(config.model_copy(update={"allow_over_budget": True}), _budget(state))
    if memory is None:
        raise ConfigError(f"cannot predict memory for {config.model!r}: its config.json lacks the model dimensions")
    return RunPrediction(model=checked.model, **memory.model_dump())


def predict_for_model(state: AppState, model: str, settings: dict[str, Any]) -> RunPrediction:
    model_dir = resolve_model_dir(model)
    model_config = read_model_config(model_dir)
    config = QLoRAConfig(model=str(model_dir), data=str(model_dir), allow_over_budget=True, **settings)
    try:
        _, memory = check_memory(config, model_config, model_dir, _budget(state), longest_tokens=None)
    except KeyError as missing:
        raise ConfigError(f"cannot predict memory for {model!r}: its config.json lacks {missing}") from None
    return RunPrediction(model=str(model_dir), **memory.model_dump())
