"""Everything checked before a run is accepted, without loading MLX: config, model folder, data, output folder."""

from __future__ import annotations

import os
from pathlib import Path

from .config import QLoRAConfig
from .dataset_check import DatasetSummary, check_dataset
from .errors import ConfigError
from .modelref import num_hidden_layers, read_model_config, resolve_model_dir


def _check_writable(folder: str) -> None:
    path = Path(folder).expanduser()
    probe = path
    while not probe.exists():  # the nearest existing ancestor decides whether we can create it
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"adapter_dir {folder!r} is not writable (checked {str(probe)!r}); pick a folder you own")


def preflight(config: QLoRAConfig) -> tuple[QLoRAConfig, DatasetSummary]:
    """Check a config; return it with paths made absolute (the worker runs elsewhere) and the dataset summary."""
    model_dir = resolve_model_dir(config.model)
    layers = num_hidden_layers(read_model_config(model_dir))
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
    return config.model_copy(update=updates), summary
