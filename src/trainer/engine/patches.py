"""Every change we make to mlx-lm's own code, in one place, applied through one reversible context.

What we change, and how far each change reaches:

- `fast_activations(model)`: the model's mlx-lm module (`mlx_lm.models.qwen2`, `.llama`, ...) imports `swiglu` and
  `scaled_dot_product_attention` by name; on float32 CPU runs we rebind both to `cpu_math.fast_swiglu` and
  `cpu_math.fast_attention` (MLX's CPU `exp` is slow) for the duration of the context only, and restore mlx-lm's own
  on exit, so nothing outlives a run or a generation or leaks between models and tests.
- Per model instance, not per library (`swap_class`, used by fastpath.py, decode_layers.py, lora_math.py): quantized
  layers, RMS norms, RoPEs and LoRA layers of one loaded model change class to our subclasses; parameters, adapters
  and saving are untouched. `stash` keeps a value on a module outside its parameter tree (a kernel, a float32 weight).
- Gradient checkpointing is ours (recompute.py), per block instance: mlx-lm's `grad_checkpoint` patches the block
  class for the whole process and recomputes too early in a compiled step.
- `dropout_keep_probability(module)`: MLX's Dropout keeps its keep probability in a private attribute.

tests/trainer/test_patches.py pins what each relies on (attribute names, signatures), and tests/test_layout.py checks
that no other module touches these internals.

The rebinding depends on mlx-lm's internals, so it is only applied on the mlx-lm versions it was checked against;
on any other it falls back to mlx-lm's own functions and says so once.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import mlx.core as mx
from mlx.nn.layers.dropout import Dropout

from .cpu_math import fast_attention, fast_swiglu

log = logging.getLogger(__name__)
#: mlx-lm versions whose model modules were checked to call `swiglu` / `scaled_dot_product_attention` by module name
TESTED_MLX_LM = frozenset({"0.32.2"})
#: name in the model's module -> our replacement
ACTIVATION_PATCHES: dict[str, Any] = {"swiglu": fast_swiglu, "scaled_dot_product_attention": fast_attention}


def mlx_lm_version() -> str:
    try:
        return version("mlx-lm")
    except PackageNotFoundError:
        return "unknown"


@cache
def patches_allowed() -> bool:
    """Whether the installed mlx-lm is one the patches were checked against (warns once when it is not)."""
    found = mlx_lm_version()
    if found in TESTED_MLX_LM:
        return True
    log.warning(
        "mlx-lm %s is not a version our CPU activation patches were checked against (%s); using mlx-lm's own SwiGLU "
        "and attention (correct, slower on the CPU). Install mlx-lm==%s for the fast ones.",
        found,
        ", ".join(sorted(TESTED_MLX_LM)),
        max(TESTED_MLX_LM),
    )
    return False


def wants_fast_activations(model: Any) -> bool:
    """Float32 models on the CPU whose mlx-lm module has a `swiglu` to replace (llama/qwen2-style MLPs)."""
    module = sys.modules.get(type(model).__module__)
    if mx.default_device() != mx.cpu or module is None or not hasattr(module, "swiglu"):
        return False
    return bool(getattr(model, "_float32_on_cpu", False))


@contextmanager
def fast_activations(model: Any, wanted: bool = True) -> Iterator[bool]:
    """Within the block, the model's mlx-lm module computes SwiGLU and attention with our CPU operations; yields
    whether it does. Restores mlx-lm's own functions on exit, whatever happens inside."""
    if not (wanted and wants_fast_activations(model) and patches_allowed()):
        yield False
        return
    module = sys.modules[type(model).__module__]
    originals = {name: getattr(module, name) for name in ACTIVATION_PATCHES if hasattr(module, name)}
    try:
        for name in originals:
            setattr(module, name, ACTIVATION_PATCHES[name])
        yield True
    finally:
        for name, original in originals.items():
            setattr(module, name, original)


def swap_class(module: Any, cls: type) -> None:
    """Make one module instance ours: `cls` subclasses its class and adds no state of its own."""
    if not isinstance(module, cls.__mro__[1]):
        raise TypeError(f"{cls.__name__} does not extend {type(module).__name__}")
    module.__class__ = cls


def stash(module: Any, name: str, value: Any) -> None:
    """A value on an MLX module that is not a parameter (a private name: MLX neither trains nor saves it)."""
    assert name.startswith("_"), name
    setattr(module, name, value)


def dropout_keep_probability(module: Any) -> float:
    """1 - p for an MLX Dropout (kept as `_p_1`), 1.0 for any other module."""
    return float(getattr(module, "_p_1", 1.0)) if isinstance(module, Dropout) else 1.0


@contextmanager
def checkpointed_blocks(model: Any, blocks: int) -> Iterator[int]:
    """Within the context, the first `blocks` of the blocks that train (those with trainable parameters) are
    recomputed in the backward pass (recompute.py), one instance at a time; yields how many. Restored on exit."""
    from mlx.utils import tree_flatten

    from .recompute import recomputed_class

    trained = [layer for layer in model.layers if tree_flatten(layer.trainable_parameters())]
    chosen = trained[: max(0, blocks)]
    originals = [type(layer) for layer in chosen]
    try:
        for layer, original in zip(chosen, originals, strict=True):
            swap_class(layer, recomputed_class(original))  # type: ignore[arg-type]  # classes hash
        yield len(chosen)
    finally:
        for layer, original in zip(chosen, originals, strict=True):
            layer.__class__ = original


@contextmanager
def adapter_off(model: Any) -> Iterator[None]:
    """Within the context every LoRA layer adds nothing (its scale 0): the base model, without a copy of it."""
    layers = [module for _, module in model.named_modules() if hasattr(module, "lora_b") and hasattr(module, "scale")]
    scales = [layer.scale for layer in layers]
    try:
        for layer in layers:
            layer.scale = 0.0
        yield
    finally:
        for layer, scale in zip(layers, scales, strict=True):
            layer.scale = scale
