"""Elementwise math that MLX's CPU backend computes slowly, rebuilt from the operations it computes fast.

MLX's CPU `exp` (and with it `sigmoid` and `silu`) runs at about 9 ns per element here, 4.5x slower than numpy's: in
the SmolLM2-shape training step (batch 4 x 64) the MLP's SiLU took 5.2 ms per block and direction, about a quarter
of the step. `exp` below is the textbook vectorizable one (Cody-Waite range reduction, a degree-7 polynomial, the
exponent set through the float's bits), compiled into one fused kernel: 0.75 ms instead of 3.6 for the same array,
and within 1e-7 of the exact value (MLX's own `exp`: 1e-6).
"""

from __future__ import annotations

import sys
from typing import Any

import mlx.core as mx

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # ln 2 split so that n * _LN2_HI is exact in float32
_LN2_LO = -2.12194440e-4
_TAYLOR = [1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0]


def fast_exp(x: mx.array) -> mx.array:
    """exp(x) for float32 x, from multiplies, adds and bit operations only."""
    x = mx.clip(x, -87.0, 87.0)
    n = mx.round(x * _LOG2E)
    r = x - n * _LN2_HI - n * _LN2_LO  # |r| <= ln(2) / 2
    p = mx.array(_TAYLOR[0], dtype=x.dtype)
    for c in _TAYLOR[1:]:
        p = p * r + c
    scale = mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)
    return p * scale


def _sigmoid(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + fast_exp(-x))


@mx.custom_function
def fast_silu(x: mx.array) -> mx.array:
    return x * _sigmoid(x)


@fast_silu.vjp
def _fast_silu_vjp(primals: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    x = primals  # a one-input custom function gets its input itself, not a tuple
    s = _sigmoid(x)
    return cotangent * s * (1.0 + x * (1.0 - s))


@mx.compile
def fast_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    silu: mx.array = fast_silu(gate)  # type: ignore[assignment]  # custom_function is untyped
    return silu * x


def use_fast_activations(model: Any) -> bool:
    """Route the model's SwiGLU (mlx-lm's `swiglu`, in llama/qwen2-style MLPs) through `fast_swiglu`; float32 CPU only.

    mlx-lm's model modules import `swiglu` by name, so the module's name is rebound (for every model of that type in
    this process: the two agree to float32 rounding)."""
    module = sys.modules.get(type(model).__module__)
    if mx.default_device() != mx.cpu or module is None or not hasattr(module, "swiglu"):
        return False
    module.swiglu = fast_swiglu  # type: ignore[attr-defined]
    return True
