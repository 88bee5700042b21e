"""Real QLoRA training with MLX-LM's tuner (its datasets, LoRA layers, step and evaluation) in a loop that resumes
exactly from crash-safe checkpoints (loop.py)."""

from __future__ import annotations

import logging
import math
import time
import types
from pathlib import Path
from typing import Any, cast

from ..errors import ConfigError, Diverged
from ..lifecycle.backend import (
    Cancelled,
    Emit,
    adapter_dir_for,
    stop_if_requested,
    stops_at_safe_points,
    stops_ignored,
)
from ..lifecycle.checkpoints import (
    checkpoints_dir,
    clean_staging,
    config_hash,
    data_hash,
    newest_verified,
    write_checkpoint,
)
from ..lifecycle.events import Checkpoint, Packed, PhaseChanged, Progress, Resumed, TrainReport, ValReport
from ..lifecycle.jobs import Phase
from ..planning.config import QLoRAConfig
from .batches import data_position
from .grpo_data import GroupData, load_group_data
from .loop import Loss, Step, SupervisedData, train_steps
from .mlx_import import require_mlx
from .plan_switch import RunPlans
from .preference_data import PreferenceData, load_preference_data, score_references
from .run_state import ADAPTERS, LoopState, adapter_weights, read_state, save_adapter, write_state

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.25


def load_for_training(config: QLoRAConfig) -> tuple[Any, Any, dict[str, Any]]:
    """Load the base model; quantize it on load when it is not quantized already (so every run is QLoRA)."""
    from mlx_lm.utils import load, quantize_model

    from .fastpath import apply_fast_path

    model, tokenizer, model_config = cast(tuple[Any, Any, dict[str, Any]], load(config.model, return_config=True))
    if config.quantize_bits and "quantization" not in model_config:
        log.info("quantizing the base model to %d bits, group size %d", config.quantize_bits, config.group_size)
        model, model_config = quantize_model(model, model_config, config.group_size, config.quantize_bits)
    if apply_fast_path(model, config.fast_path) and config.dense_weights:
        from .fastpath import cache_dense_weights

        cache_dense_weights(model, budget_bytes=1 << 62)  # the run's memory budget and watchdog bound it
    return model, tokenizer, model_config


def adapter_config(config: QLoRAConfig, num_layers: int) -> dict[str, Any]:
    """What `mlx_lm.tuner.utils.load_adapters` (and so `mlx_lm.generate --adapter-path`) reads back."""
    return {
        "fine_tune_type": "lora",
        "model": config.model,
        "num_layers": num_layers,
        "lora_parameters": {"rank": config.rank, "scale": config.lora_scale, "dropout": config.dropout},
        "quantize_bits": config.quantize_bits,
        "group_size": config.group_size,
        "iters": config.iters,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "max_seq_length": config.max_seq_length,
        "mask_prompt": config.mask_prompt,
        "seed": config.seed,
    }


class _RunEvents:
    """The loop's hooks: phase, progress, report and checkpoint events, stops at safe points, crash-safe saves."""

    def __init__(
        self, config: QLoRAConfig, run_dir: Path, adapter_dir: Path, emit: Emit, model: Any, optimizer: Any
    ) -> None:
        self.config, self.adapter_dir, self.emit = config, adapter_dir, emit
        self.model, self.optimizer = model, optimizer
        self.checkpoints = checkpoints_dir(run_dir)
        self.phase = Phase.LOADING_DATA
        self.last_progress = 0.0
        self.done = LoopState()
        self.saved_step = 0
        self.per_epoch = 1
        self.hashes = ("", "")
        self.primary = True  # in a run of several processes, rank 0 alone writes checkpoints and the adapter
        self.plans: RunPlans | None = None

    def set_phase(self, new: Phase) -> None:
        if new is not self.phase:
            self.phase = new
            self.emit(PhaseChanged(phase=new))

    def before_step(self, step: int) -> tuple[Step, Loss] | None:
        stop_if_requested()  # between steps: the model's arrays are all evaluated here
        self.set_phase(Phase.TRAINING)
        now = time.monotonic()
        if not self.last_progress or now - self.last_progress >= PROGRESS_EVERY_S:
            self.last_progress = now
            self.emit(Progress(iteration=step, iters=self.config.iters))
        return self.plans.before_step(step) if self.plans is not None else None

    def after_step(self, done: LoopState, inputs: int) -> None:
        self.done = done
        if self.plans is not None:
            self.plans.after_step(done, inputs)

    def safe_point(self) -> None:
        stop_if_requested()

    def evaluating(self) -> None:
        self.set_phase(Phase.EVALUATING)

    def val_report(self, info: dict[str, Any]) -> None:
        _check_finite("validation", info["val_loss"], info["iteration"], self.config)
        self.emit(ValReport(**info))
        self.set_phase(Phase.TRAINING)

    def train_report(self, info: dict[str, Any]) -> None:
        _check_finite("train", info["train_loss"], info["iteration"], self.config)
        self.emit(TrainReport(**info))

    def save(self, done: LoopState) -> None:
        """A checkpoint to resume from, and the adapter file as of it (both written crash-safely)."""
        import mlx.core as mx

        if not self.primary:
            return
        weights = adapter_weights(self.model)
        if not all(bool(mx.all(mx.isfinite(w)).item()) for w in weights.values()):
            raise Diverged(f"the adapter's weights became NaN or infinite by step {done.step}; not saving them")
        started = time.monotonic()
        position = data_position(done.step, self.per_epoch)
        config_hash, data_hash = self.hashes
        folder = write_checkpoint(
            self.checkpoints,
            done.step,
            lambda staging: write_state(staging, self.model, self.optimizer, done, position),
            config_hash=config_hash,
            data_hash=data_hash,
        )
        save_adapter(self.model, self.adapter_dir / ADAPTERS)
        self.saved_step = done.step
        seconds = round(time.monotonic() - started, 3)
        self.emit(Checkpoint(iteration=done.step, path=str(folder), adapter_dir=str(self.adapter_dir), seconds=seconds))

    def save_on_stop(self) -> None:
        """A stop (cancel, the watchdog) keeps everything learned: a checkpoint of the last finished step."""
        if not self.primary:
            return
        if self.done.step > self.saved_step:
            self.save(self.done)
            log.info("stopped: checkpoint %d saved", self.done.step)
        elif not (self.adapter_dir / ADAPTERS).is_file():  # stopped before a step ended: the untrained adapter
            save_adapter(self.model, self.adapter_dir / ADAPTERS)


def _check_finite(which: str, loss: float, iteration: int, config: QLoRAConfig) -> None:
    if not math.isfinite(loss):
        raise Diverged(
            f"the {which} loss became {loss} at iteration {iteration}: training diverged; lower learning_rate "
            f"(now {config.learning_rate:g}) or alpha (now {config.alpha:g}, scale alpha/rank = {config.lora_scale:g})"
        )


def _add_lora(config: QLoRAConfig, model: Any) -> int:
    """Freeze the base and put LoRA on the last `num_layers` blocks; returns how many."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from .lora_math import lora_in_half_precision

    num_layers = len(model.layers) if config.num_layers == -1 else config.num_layers
    if num_layers > len(model.layers):
        raise ConfigError(f"num_layers={num_layers} but the model has only {len(model.layers)} layers")
    model.freeze()
    linear_to_lora_layers(
        model, num_layers, {"rank": config.rank, "scale": config.lora_scale, "dropout": config.dropout}
    )
    lora_in_half_precision(model)
    return num_layers


def _resume(events: _RunEvents, model: Any, optimizer: Any, emit: Emit) -> None:
    """Continue from the run's newest checkpoint that verifies, if it has one. In a run of several processes rank 0
    reads it and the others receive its state, so ranks on other hosts need no copy of the run folder."""
    import mlx.core as mx

    from .distributed import any_rank, from_primary

    resume_from = newest_verified(events.checkpoints) if events.primary else None
    if not any_rank(resume_from is not None):
        return
    if resume_from is not None:
        events.done = read_state(resume_from.path, model, optimizer)
        emit(Resumed(iteration=events.done.step, path=str(resume_from.path)))
    else:
        optimizer.init(model.trainable_parameters())  # the same tree as rank 0's, to be overwritten by it
    model.update(from_primary(model.trainable_parameters()))
    optimizer.state = from_primary(optimizer.state)
    hi, lo = from_primary(cast(list[Any], mx.random.state)[0]).tolist()  # dropout's generator, as rank 0 read it
    mx.random.seed((int(hi) << 32) | int(lo))  # a key is (hi, lo) of a 64-bit seed, as in read_state
    events.done = from_primary(events.done)
    events.saved_step = events.done.step


def _run_data(config: QLoRAConfig, tokenizer: Any) -> SupervisedData | PreferenceData | GroupData:
    """MLX-LM's datasets for sft; preference pairs for dpo and orpo; coding tasks with tests for grpo."""
    from mlx_lm.tuner.datasets import load_local_dataset

    from .batches import by_token_length

    if config.preference:
        return load_preference_data(config, tokenizer)
    if config.mode == "grpo":
        return load_group_data(config, tokenizer)
    options = types.SimpleNamespace(mask_prompt=config.mask_prompt)
    train_set, valid_set, _ = load_local_dataset(Path(config.data), tokenizer, options)
    valid = by_token_length(valid_set) if len(valid_set) else None
    return SupervisedData(by_token_length(train_set), valid, config)


class MlxTrainingBackend:
    name = "mlx"

    def device(self) -> str:
        require_mlx()
        import mlx.core as mx

        return str(mx.default_device())

    def train(self, config: QLoRAConfig, run_dir: Path, emit: Emit) -> Path:
        """Train, continuing from the run's newest checkpoint that verifies, if it has one (a resumed run)."""
        import mlx.core as mx
        import mlx.optimizers as optim
        from mlx_lm.utils import maybe_set_recommended_wired_limit, save_config

        from ..planning.device import group_backend
        from .distributed import is_primary, join_group
        from .memory_limit import hold_to_budget
        from .patches import fast_activations

        if config.distributed:
            join_group(group_backend(config.backend))
        primary = is_primary()
        mx.random.seed(config.seed)
        emit(PhaseChanged(phase=Phase.LOADING_MODEL))
        model, tokenizer, _ = load_for_training(config)
        emit(PhaseChanged(phase=Phase.LOADING_DATA))
        data = _run_data(config, tokenizer)
        if isinstance(data, SupervisedData) and data.packed is not None and primary:
            rows = data.packed
            emit(Packed(records=rows.records, rows=len(rows.rows), width=rows.width, filled=round(rows.filled, 4)))
        num_layers = _add_lora(config, model)
        if isinstance(data, GroupData):
            data.model = model  # it samples each step's completions
        adapter_dir = adapter_dir_for(config, run_dir)
        if primary:
            adapter_dir.mkdir(parents=True, exist_ok=True)
            save_config(adapter_config(config, num_layers), adapter_dir / "adapter_config.json")
        optimizer = optim.Adam(learning_rate=config.learning_rate)
        events = _RunEvents(config, run_dir, adapter_dir, emit, model, optimizer)
        events.primary = primary
        events.per_epoch = max(1, data.batches_per_epoch)
        events.hashes = (config_hash(config), data_hash(Path(config.data)))
        if primary and clean_staging(events.checkpoints):
            log.info("removed a checkpoint a crash left half-written")
        _resume(events, model, optimizer, emit)
        if isinstance(data, PreferenceData) and config.mode == "dpo":
            with fast_activations(model):  # the functions the steps run: at step 0 every margin is exactly 0
                score_references(data, model, run_dir)
        plans = events.plans = RunPlans(config, run_dir, model, optimizer, emit, events.done.step)
        maybe_set_recommended_wired_limit()
        hold_to_budget(config)
        try:
            with fast_activations(model), plans, stops_at_safe_points():
                train_steps(
                    model,
                    optimizer,
                    data,
                    config,
                    plans.step,
                    plans.val_loss,
                    events,
                    events.done,
                )
        except Cancelled:
            events.save_on_stop()
            raise
        events.set_phase(Phase.SAVING)
        if primary:
            with stops_ignored():  # every step is done: a stop now has nothing left to stop, and must not cut the save
                save_adapter(model, adapter_dir / ADAPTERS)
        return adapter_dir
