"""Every change we make to mlx-lm's own code, in one place, applied through one reversible context.

What we change, and how far each change reaches:

- `fast_activations(model)`: the model's mlx-lm module (`mlx_lm.models.qwen2`, `.llama`, ...) imports `swiglu` and
  `scaled_dot_product_attention` by name; on float32 CPU runs we rebind both to `cpu_math.fast_swiglu` and
  `cpu_math.fast_attention` (MLX's CPU `exp` is slow) for the duration of the context only, and restore mlx-lm's own
  on exit, so nothing outlives a run or a generation or leaks between models and tests.
- Per model instance, not per library (see fastpath.py, decode_layers.py): quantized layers, RMS norms and RoPEs of
  one loaded model change class to our subclasses; parameters, adapters and saving are untouched.

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
