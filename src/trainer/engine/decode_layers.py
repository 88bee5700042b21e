"""Decode on the CPU through our kernels (`decode_kernel.py`): RMS norm and rotary embedding layers whose few-row
calls are one kernel operation each instead of MLX's composed fallbacks; more rows (training, prefill) stay MLX's.

Like the fast quantized layers, only the class of a layer changes (and a private attribute holds the kernel module):
parameters, their names and saved adapters are untouched.
"""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
from mlx.nn.layers.base import Module
from mlx.nn.layers.normalization import RMSNorm
from mlx.nn.layers.positional_encoding import RoPE

from .decode_kernel import DECODE_ROWS, few_rows
from .patches import stash, swap_class


class DecodeRMSNorm(RMSNorm):
    def __call__(self, x: mx.array) -> mx.array:
        kernel = getattr(self, "_decode_kernel", None)
        if kernel is None or x.dtype != mx.float32 or not few_rows(x):
            return cast(mx.array, super().__call__(x))
        return cast(mx.array, kernel.rms_norm(x, self["weight"], self.eps))


class DecodeRoPE(RoPE):
    def __call__(self, x: mx.array, offset: Any = 0) -> mx.array:
        kernel = getattr(self, "_decode_kernel", None)
        if kernel is None or x.dtype != mx.float32 or x.shape[-2] > DECODE_ROWS or not isinstance(offset, int):
            return cast(mx.array, super().__call__(x, offset=offset))
        return cast(mx.array, kernel.rope(x, self.dims, self.traditional, self.base, self.scale, offset))


_DECODE_CLASSES: dict[type, type] = {RMSNorm: DecodeRMSNorm, RoPE: DecodeRoPE}


def use_decode_layers(model: Module, kernel: Any) -> int:
    """Switch the model's RMS norms and plain RoPEs (exactly those classes: scaled variants keep theirs) to the
    kernel's for decode; returns how many were switched."""
    switched = 0
    for _, module in model.named_modules():
        decode_class = _DECODE_CLASSES.get(type(module))
        if decode_class is not None:
            swap_class(module, decode_class)
            stash(module, "_decode_kernel", kernel)
            switched += 1
    return switched
