"""What a checkpoint holds, in MLX terms: the adapter, the optimizer's state, MLX's random key and the loop's position.

`lifecycle.checkpoints` makes the folder durable and verifiable; this module fills it and reads it back, so that a
run continued from it computes what the uninterrupted run would have.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..lifecycle.checkpoints import replace_file_atomically

ADAPTERS = "adapters.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


@dataclass
class LoopState:
    """Where the training loop is: steps done and tokens trained on."""

    step: int = 0
    trained_tokens: int = 0


def adapter_weights(model: Any) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter(model: Any, adapter_file: Path) -> None:
    """The adapter where `mlx_lm` and `load_model` read it, replaced atomically (never half-written)."""
    weights = adapter_weights(model)
    replace_file_atomically(adapter_file, lambda tmp: mx.save_safetensors(str(tmp), weights))


def write_state(folder: Path, model: Any, optimizer: Any, loop: LoopState, data_position: tuple[int, int]) -> None:
    """The checkpoint's files (the caller fsyncs them and writes the manifest)."""
    mx.save_safetensors(str(folder / ADAPTERS), adapter_weights(model))
    mx.save_safetensors(str(folder / OPTIMIZER), dict(tree_flatten(optimizer.state)))
    key: list[int] = mx.random.state[0].tolist()  # type: ignore[index]
    hi, lo = key
    epoch, batch = data_position
    state = {**asdict(loop), "rng_key": [hi, lo], "data_position": {"epoch": epoch, "batch": batch}}
    (folder / STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")


def read_state(folder: Path, model: Any, optimizer: Any) -> LoopState:
    """Load a checkpoint into the model (its LoRA weights), the optimizer and MLX's random generator."""
    model.load_weights(list(mx.load(str(folder / ADAPTERS)).items()), strict=False)  # type: ignore[union-attr]
    optimizer.state = tree_unflatten(list(mx.load(str(folder / OPTIMIZER)).items()))  # type: ignore[union-attr]
    state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    hi, lo = state["rng_key"]
    mx.random.seed((int(hi) << 32) | int(lo))  # a key is (hi, lo) of a 64-bit seed: this sets it exactly
    mx.eval(model.parameters(), optimizer.state)
    return LoopState(step=int(state["step"]), trained_tokens=int(state["trained_tokens"]))
