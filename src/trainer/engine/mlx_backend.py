"""Real QLoRA training with MLX-LM's own tuner (`mlx_lm.tuner`): its datasets, LoRA layers and `train` loop."""

from __future__ import annotations

import logging
import math
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from ..errors import ConfigError, Diverged
from ..lifecycle.backend import Cancelled, Emit, adapter_dir_for, stop_if_requested, stops_at_safe_points
from ..lifecycle.events import Checkpoint, PhaseChanged, Progress, TrainReport, ValReport
from ..lifecycle.jobs import Phase
from ..planning.config import QLoRAConfig

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
    """Phase, progress and checkpoint events around mlx-lm's loop, which has no hooks but its batch iterator and
    its report callback."""

    def __init__(self, config: QLoRAConfig, adapter_dir: Path, emit: Emit) -> None:
        self.config, self.adapter_dir, self.emit = config, adapter_dir, emit
        self.phase = Phase.LOADING_DATA
        self.last_progress = 0.0

    def set_phase(self, new: Phase) -> None:
        if new is not self.phase:
            self.phase = new
            self.emit(PhaseChanged(phase=new))

    def callback(self) -> Any:
        from mlx_lm.tuner.callbacks import TrainingCallback

        events = self

        class Reporter(TrainingCallback):  # type: ignore[misc]
            def on_train_loss_report(self, train_info: dict[str, Any]) -> None:
                _check_finite("train", train_info["train_loss"], train_info["iteration"], events.config)
                events.emit(TrainReport(**train_info))

            def on_val_loss_report(self, val_info: dict[str, Any]) -> None:
                _check_finite("validation", val_info["val_loss"], val_info["iteration"], events.config)
                events.emit(ValReport(**val_info))
                events.set_phase(Phase.TRAINING)  # mlx-lm reports right after the validation pass ends

        return Reporter()

    def batches(
        self, dataset: Any, batch_size: int, max_seq_length: int, loop: bool = False, **kw: Any
    ) -> Iterator[Any]:
        """mlx-lm's own batching, plus phase, progress and checkpoint events."""
        from mlx_lm.tuner.trainer import iterate_batches

        if not loop:  # a validation pass; mlx-lm stops reading it early, so no code runs after it
            self.set_phase(Phase.EVALUATING)
            for batch in iterate_batches(dataset, batch_size, max_seq_length, loop=loop, **kw):
                stop_if_requested()
                yield batch
            return
        self.set_phase(Phase.TRAINING)
        save_every, iters = self.config.save_every, self.config.iters
        for it, batch in enumerate(iterate_batches(dataset, batch_size, max_seq_length, loop=loop, **kw), start=1):
            stop_if_requested()  # between steps: the model's arrays are all evaluated here
            done = it - 1
            if done and done % save_every == 0:  # mlx-lm saved this checkpoint before asking again
                self.emit(Checkpoint(iteration=done, path=str(self.adapter_dir / f"{done:07d}_adapters.safetensors")))
            now = time.monotonic()
            if it == 1 or now - self.last_progress >= PROGRESS_EVERY_S:
                self.last_progress = now
                self.emit(Progress(iteration=it, iters=iters))
            yield batch


def _check_finite(which: str, loss: float, iteration: int, config: QLoRAConfig) -> None:
    if not math.isfinite(loss):
        raise Diverged(
            f"the {which} loss became {loss} at iteration {iteration}: training diverged; lower learning_rate "
            f"(now {config.learning_rate:g}) or alpha (now {config.alpha:g}, scale alpha/rank = {config.lora_scale:g})"
        )


def _training_args(config: QLoRAConfig, adapter_file: Path) -> Any:
    from mlx_lm.tuner.trainer import TrainingArgs

    return TrainingArgs(
        batch_size=config.batch_size,
        iters=config.iters,
        val_batches=config.val_batches,
        steps_per_report=config.steps_per_report,
        steps_per_eval=config.steps_per_eval,
        steps_per_save=config.save_every,
        adapter_file=str(adapter_file),
        max_seq_length=config.max_seq_length,
        grad_checkpoint=config.grad_checkpoint,
    )


def _training_loop(config: QLoRAConfig, model: Any) -> tuple[Any, dict[str, Any]]:
    """mlx-lm's `train` with our loss, or the layerwise loop; and the extra arguments it takes."""
    from mlx_lm.tuner.trainer import train

    from ..planning.device import fast_path_on
    from .losses import cross_entropy_for, training_loss

    fast = fast_path_on(config.fast_path)
    if not config.layerwise:
        return train, {"loss": training_loss(fast, config.chunked_loss)}
    from .layerwise import supports_layerwise, train_layerwise

    if not supports_layerwise(model):
        raise ConfigError(f"layerwise=true is not supported for {type(model).__module__}; set it to false")
    return train_layerwise, {"ce": cross_entropy_for(fast)}


def _add_lora(config: QLoRAConfig, model: Any) -> int:
    """Freeze the base and put LoRA on the last `num_layers` blocks; returns how many."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    num_layers = len(model.layers) if config.num_layers == -1 else config.num_layers
    if num_layers > len(model.layers):
        raise ConfigError(f"num_layers={num_layers} but the model has only {len(model.layers)} layers")
    model.freeze()
    linear_to_lora_layers(
        model, num_layers, {"rank": config.rank, "scale": config.lora_scale, "dropout": config.dropout}
    )
    return num_layers


class MlxTrainingBackend:
    name = "mlx"

    def device(self) -> str:
        import mlx.core as mx

        return str(mx.default_device())

    def train(self, config: QLoRAConfig, run_dir: Path, emit: Emit) -> Path:
        import mlx.core as mx
        import mlx.optimizers as optim
        import numpy as np
        from mlx.utils import tree_flatten
        from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
        from mlx_lm.utils import save_config

        from .patches import fast_activations

        mx.random.seed(config.seed)
        np.random.seed(config.seed)  # mlx-lm shuffles batches with numpy
        emit(PhaseChanged(phase=Phase.LOADING_MODEL))
        model, tokenizer, _ = load_for_training(config)
        emit(PhaseChanged(phase=Phase.LOADING_DATA))
        options = types.SimpleNamespace(mask_prompt=config.mask_prompt)
        train_set, valid_set, _ = load_local_dataset(Path(config.data), tokenizer, options)
        num_layers = _add_lora(config, model)
        adapter_dir = adapter_dir_for(config, run_dir)
        adapter_dir.mkdir(parents=True, exist_ok=True)
        save_config(adapter_config(config, num_layers), adapter_dir / "adapter_config.json")
        adapter_file = adapter_dir / "adapters.safetensors"
        events = _RunEvents(config, adapter_dir, emit)
        loop, extra = _training_loop(config, model)
        try:
            with fast_activations(model), stops_at_safe_points():
                loop(
                    model=model,
                    optimizer=optim.Adam(learning_rate=config.learning_rate),
                    train_dataset=CacheDataset(train_set),
                    val_dataset=CacheDataset(valid_set) if len(valid_set) else None,
                    args=_training_args(config, adapter_file),
                    iterate_batches=events.batches,
                    training_callback=events.callback(),
                    **extra,
                )
        except Cancelled:
            # keep what was learned: the adapter as of the last finished step, loadable like a final one
            mx.save_safetensors(str(adapter_file), dict(tree_flatten(model.trainable_parameters())))
            log.info("cancelled: adapter saved to %s", adapter_file)
            raise
        emit(PhaseChanged(phase=Phase.SAVING))
        return adapter_dir
