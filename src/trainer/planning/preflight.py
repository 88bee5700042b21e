"""Everything checked before a run is accepted, without loading MLX: config, model folder, data, output folder.

`prepare_run` turns a parsed config into a frozen `PreparedRun`: paths resolved (the worker runs elsewhere), the
memory budget and sample interval filled in, fit_to_budget applied, the dataset read once and the memory predicted.
This is where a run predicted over its budget is refused (the worker's watchdog enforces the budget while it runs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ..errors import ConfigError
from ..settings import DEFAULT_SAMPLE_INTERVAL_S, default_budget_gb, default_home
from .config import QLoRAConfig
from .dataset_check import DatasetSummary, check_dataset, check_size
from .dataset_report import trainable_summary, validate_dataset
from .device import backend_kind, group_backend
from .hostfile import read_hostfile
from .memory_plan import MemoryCheck, check_memory
from .modelref import num_hidden_layers, read_model_config, resolve_model_dir
from .paths import PathPolicy, check_adapter_dir

log = logging.getLogger(__name__)


class RunDefaults(BaseModel):
    """What a run gets where its config is silent: the server's (or CLI's) settings."""

    model_config = ConfigDict(frozen=True)

    memory_budget_gb: float | None = None  # None: settings.default_budget_gb()
    sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S
    models_root: Path | None = None  # where GGUF imports go; None: the default home's models/
    runs_dir: Path | None = None  # the store's run folders, which an adapter_dir may not point into
    roots: tuple[Path, ...] | None = None  # None: any path (the CLI); else the server's allowed roots
    max_queued: int = 100  # runs waiting at once, across every server on the home
    max_dataset_mb: float = 2048.0  # train.jsonl and valid.jsonl together

    @classmethod
    def for_home(cls, home: Path, **settings: object) -> RunDefaults:
        return cls.model_validate({"models_root": home / "models", "runs_dir": home / "runs", **settings})

    def path_policy(self) -> PathPolicy:
        return PathPolicy(self.roots)

    def budget_gb(self) -> float:
        return self.memory_budget_gb if self.memory_budget_gb is not None else default_budget_gb()

    def models(self) -> Path:
        return self.models_root or default_home() / "models"


class PreparedRun(BaseModel):
    """A run ready to queue: the config the worker will use and what the checks found."""

    model_config = ConfigDict(frozen=True)

    config: QLoRAConfig
    dataset: DatasetSummary
    memory: MemoryCheck | None  # None: the model's config.json lacks the dimensions a prediction needs

    @property
    def predicted_peak_gb(self) -> float | None:
        return self.memory.prediction.total_gb if self.memory else None


def _check_writable(folder: str) -> None:
    path = Path(folder).expanduser().resolve()
    probe = path
    while not probe.exists():  # the nearest existing ancestor decides whether we can create it
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"adapter_dir {folder!r} is not writable (checked {str(probe)!r}); pick a folder you own")


def _with_hosts(config: QLoRAConfig, policy: PathPolicy) -> QLoRAConfig:
    """A run over the machines of a hostfile (inside the allowed roots): one process per host, its absolute path."""
    if config.hosts is None:
        return config
    hostfile = str(policy.check(Path(config.hosts), "hosts"))
    hosts = read_hostfile(hostfile, group_backend(config.backend))
    if config.num_processes not in (1, len(hosts)):
        raise ConfigError(
            f"num_processes is {config.num_processes} but hosts {config.hosts!r} lists {len(hosts)} machines, one "
            f"process each; leave num_processes out or set it to {len(hosts)}"
        )
    return QLoRAConfig.parse({**config.model_dump(), "num_processes": len(hosts), "hosts": hostfile})


def _read_dataset(
    config: QLoRAConfig, model_dir: Path, data_dir: Path, max_mb: float, progress: Callable[[float], None] | None
) -> DatasetSummary:
    """Every line read once: with the model's tokenizer and chat template where it has tokenizer.json (as the run
    will tokenize it, a batch at a time), else checked for format alone."""
    if not (model_dir / "tokenizer.json").is_file():
        return check_dataset(str(data_dir), config.batch_size, None, max_mb)
    check_size(str(data_dir), max_mb)
    report = validate_dataset(
        data_dir, model_dir, max_seq_length=config.max_seq_length, mask_prompt=config.mask_prompt, progress=progress
    )
    return trainable_summary(report, config.batch_size)


def _check_mode(config: QLoRAConfig, fmt: str) -> None:
    """Preference modes train on pairs, grpo on coding tasks with tests, and each of those only in its mode."""
    wanted = {"dpo": "preference", "orpo": "preference", "grpo": "tests"}.get(config.mode)
    layouts = {
        "preference": '{"prompt": ..., "chosen": ..., "rejected": ...}',
        "tests": '{"prompt": ..., "tests": "assert f(1) == 2 ..."}',
    }
    if wanted is not None and fmt != wanted:
        raise ConfigError(
            f"mode {config.mode!r} trains on {wanted} records, but {config.data} holds {fmt} records; give it "
            f'{layouts[wanted]} lines, or use mode "sft"'
        )
    if wanted is None and fmt in layouts:
        fitting = "'dpo' or 'orpo'" if fmt == "preference" else "'grpo'"
        raise ConfigError(f"{config.data} holds {fmt} records; set mode to {fitting} to train on them")
    if config.own_loss and config.num_processes > 1:
        raise ConfigError(f"mode {config.mode!r} runs in one process for now; set num_processes to 1")


def prepare_run(
    config: QLoRAConfig, defaults: RunDefaults | None = None, progress: Callable[[float], None] | None = None
) -> PreparedRun:
    """Check a config and prepare it; raises ConfigError (and writes nothing) when the run cannot start. `progress`
    gets the fraction of the dataset read, as it is read."""
    defaults = defaults or RunDefaults()
    policy = defaults.path_policy()
    config = _with_hosts(config, policy)
    model_dir = resolve_model_dir(config.model, defaults.models(), policy)
    model_config = read_model_config(model_dir)
    layers = num_hidden_layers(model_config)
    if layers is not None and config.num_layers > layers:
        raise ConfigError(
            f"num_layers={config.num_layers} but the model {config.model!r} has only {layers} layers; "
            f"use at most {layers} (or -1 for all)"
        )
    data_dir = policy.check_folder(Path(config.data), "data folder")
    summary = _read_dataset(config, model_dir, data_dir, defaults.max_dataset_mb, progress)
    _check_mode(config, summary.format)
    updates: dict[str, object] = {
        "model": str(model_dir),
        "data": str(data_dir),
        "memory_sample_interval": config.memory_sample_interval or defaults.sample_interval_s,
    }
    if config.adapter_dir is not None:
        runs_dir = defaults.runs_dir or default_home() / "runs"
        protected = {"the model's folder": model_dir, "the dataset's folder": data_dir, "the models": defaults.models()}
        updates["adapter_dir"] = str(check_adapter_dir(Path(config.adapter_dir), runs_dir, policy, protected))
        _check_writable(config.adapter_dir)
    config = config.model_copy(update=updates)
    budget = defaults.budget_gb()
    if config.num_processes > 1 and not config.hosts and backend_kind() != "cuda":  # they share this host's memory
        budget = round(budget / config.num_processes, 2)
    try:
        config, check = check_memory(config, model_config, budget, summary.longest_tokens, summary.length_sample)
    except KeyError as missing:  # a config without the dimensions we need: the watchdog still guards the run
        log.warning("no memory prediction for %s: its config lacks %s", config.model, missing)
        config = config.model_copy(update={"memory_budget_gb": config.memory_budget_gb or budget})
        return PreparedRun(config=config, dataset=summary, memory=None)
    return PreparedRun(config=config, dataset=summary, memory=check)
