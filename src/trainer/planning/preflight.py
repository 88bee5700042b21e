"""Everything checked before a run is accepted, without loading MLX: config, model folder, data, output folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import ConfigError
from .config import QLoRAConfig
from .dataset_check import DatasetSummary, check_dataset
from .memory_plan import MemoryCheck, check_memory
from .memory_plan import default_budget_gb as default_budget_gb_now
from .modelref import num_hidden_layers, read_model_config, resolve_model_dir

log = logging.getLogger(__name__)


def _check_writable(folder: str) -> None:
    path = Path(folder).expanduser()
    probe = path
    while not probe.exists():  # the nearest existing ancestor decides whether we can create it
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"adapter_dir {folder!r} is not writable (checked {str(probe)!r}); pick a folder you own")


def preflight(
    config: QLoRAConfig, default_budget_gb: float | None = None
) -> tuple[QLoRAConfig, DatasetSummary, MemoryCheck | None]:
    """Check a config; return it with paths made absolute (the worker runs elsewhere), its budget resolved and
    fit_to_budget applied, the dataset summary and the memory prediction (None for a model config we cannot read)."""
    model_dir = resolve_model_dir(config.model)
    model_config = read_model_config(model_dir)
    layers = num_hidden_layers(model_config)
    if layers is not None and config.num_layers > layers:
        raise ConfigError(
            f"num_layers={config.num_layers} but the model {config.model!r} has only {layers} layers; "
            f"use at most {layers} (or -1 for all)"
        )
    summary = check_dataset(config.data, config.batch_size)
    updates: dict[str, str] = {"model": str(model_dir), "data": str(Path(config.data).expanduser().resolve())}
    if config.adapter_dir is not None:
        _check_writable(config.adapter_dir)
        updates["adapter_dir"] = str(Path(config.adapter_dir).expanduser().resolve())
    config = config.model_copy(update=updates)
    budget = default_budget_gb if default_budget_gb is not None else default_budget_gb_now()
    try:
        config, check = check_memory(config, model_config, model_dir, budget)
    except KeyError as missing:  # a config without the dimensions we need: the watchdog still guards the run
        log.warning("no memory prediction for %s: its config lacks %s", config.model, missing)
        return config.model_copy(update={"memory_budget_gb": config.memory_budget_gb or budget}), summary, None
    return config, summary, check
