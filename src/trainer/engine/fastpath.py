"""A fast path for quantized layers off Apple silicon, with weights still stored 4-bit.

MLX's CPU (and, for multi-row inputs, CUDA) quantized matmul is far slower than a dequantize-then-GEMM. We compute
multi-row inputs (training, prompt prefill) as dequantize + GEMM. Decode (a few rows) uses our CPU kernel for 4- and
8-bit layers where it could be built (`decode_kernel.py`), else MLX's own kernel (on CUDA always MLX's: fast there).

Memory: a plain dequantize-then-GEMM keeps every layer's dequantized weight alive for the backward pass. Here the
backward recomputes it (an `mx.custom_function` whose VJP dequantizes again), and each dequantize is done in row
chunks: on the CPU `mx.dequantize` briefly needs twice its output, so an unchunked large weight (the output head of a
49k-vocabulary model is 113 MB in float32) was what held the memory in earlier attempts, not the backward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, cast

import mlx.core as mx
from mlx.nn.layers.base import Module
from mlx.nn.layers.quantized import QuantizedEmbedding, QuantizedLinear

from ..planning.device import fast_path_on
from . import decode_kernel
from .cpu_math import row_ranges
from .decode_kernel import few_rows
from .decode_layers import use_decode_layers
from .patches import stash, swap_class

log = logging.getLogger(__name__)

#: largest dequantized chunk, in elements. Small on the CPU, where it bounds the dequantize's scratch memory;
#: unchunked on a GPU, where chunks cost speed and saved nothing (docs/benchmarks.md)
CPU_CHUNK_ELEMENTS = 512 * 1024
GPU_CHUNK_ELEMENTS = 1 << 62


def chunk_elements() -> int:
    return CPU_CHUNK_ELEMENTS if mx.default_device() == mx.cpu else GPU_CHUNK_ELEMENTS


def _row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    return row_ranges(rows, cols, chunk_elements())


@cache
def _dequantized_matmul(group_size: int, bits: int, mode: str, n_chunks: int) -> Callable[..., mx.array]:
    """y = x @ dequantize(w).T, whose backward re-dequantizes w (chunk by chunk) instead of keeping it."""

    def chunks(w: mx.array, scales: mx.array, biases: mx.array, dtype: mx.Dtype) -> list[tuple[int, int, mx.array]]:
        out = []
        rows, cols = w.shape[0], w.shape[1] * 32 // bits
        for start, stop in _row_chunks(rows, cols):
            part = mx.dequantize(
                w[start:stop], scales[start:stop], biases[start:stop], group_size=group_size, bits=bits, mode=mode
            )
            out.append((start, stop, part.astype(dtype)))
        return out

    @mx.custom_function
    def matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        # depend on the input, so the scheduler dequantizes each weight just before its GEMM: the dequantizes are
        # otherwise leaves of the step graph, free to run (and hold their output) long before they are needed
        w, scales, biases = mx.depends([w, scales, biases], [x])
        parts = [x @ wd.T for _, _, wd in chunks(w, scales, biases, x.dtype)]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)

    @matmul.vjp
    def matmul_vjp(
        primals: tuple[mx.array, ...], cotangent: mx.array, output: mx.array
    ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        x, w, scales, biases = primals
        # depend on the cotangent so the scheduler cannot dequantize for the backward pass during the forward one
        w, scales, biases = mx.depends([w, scales, biases], [cotangent])
        grad_x: mx.array | None = None
        for start, stop, wd in chunks(w, scales, biases, cotangent.dtype):
            part = cotangent[..., start:stop] @ wd
            grad_x = part if grad_x is None else grad_x + part
        assert grad_x is not None
        return grad_x.astype(x.dtype), mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return cast(Callable[..., mx.array], matmul)


class _KeepDequantized:
    active = False


@contextmanager
def keep_dequantized() -> Iterator[None]:
    """Within this context (at trace time), multi-row inputs use a plain dequantize-then-GEMM whose dequantized
    weight autodiff keeps for the backward pass: faster where only a block's weights are alive at once (the layerwise
    step's recomputation), never for a whole-model graph."""
    before, _KeepDequantized.active = _KeepDequantized.active, True
    try:
        yield
    finally:
        _KeepDequantized.active = before


def dequantized_weight(module: Any, after: mx.array | None = None) -> mx.array:
    """A quantized layer's whole weight, dequantized (once `after` exists, when given: not early in a step's graph)."""
    weight, scales = module["weight"], module["scales"]
    if after is not None:
        weight, scales = mx.depends([weight, scales], [after])
    mode = getattr(module, "mode", "affine")
    biases = module.get("biases")
    return mx.dequantize(weight, scales, biases, group_size=module.group_size, bits=module.bits, mode=mode)


def _dense(module: Any, x: mx.array) -> mx.array:
    if _KeepDequantized.active:
        return x @ dequantized_weight(module).astype(x.dtype).T
    n_chunks = len(_row_chunks(module["weight"].shape[0], x.shape[-1]))
    fn = _dequantized_matmul(module.group_size, module.bits, module.mode, n_chunks)
    return fn(x, module["weight"], module["scales"], module["biases"])


def _decode(module: Any, x: mx.array) -> mx.array | None:
    """A few rows through the CPU decode kernel, when the layer has it (see attach_decode_kernel) and x is float32."""
    kernel = getattr(module, "_decode_kernel", None)
    if kernel is None or x.dtype != mx.float32 or not few_rows(x):
        return None
    return cast(
        mx.array, kernel.qgemv(x, module["weight"], module["scales"], module["biases"], module.group_size, module.bits)
    )


class FastQuantizedLinear(QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = _decode(self, x)
        if y is None:
            dense = getattr(self, "_dense_weight", None)  # stored (input, output): see cache_dense_weights
            if dense is not None:
                y = x @ dense
            elif few_rows(x):
                return cast(mx.array, super().__call__(x))
            else:
                y = _dense(self, x)
        return y + self["bias"] if "bias" in self else y


class FastQuantizedEmbedding(QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        y = _decode(self, x)
        if y is not None:
            return y
        if (dense := getattr(self, "_dense_weight", None)) is not None:
            return cast(mx.array, x @ dense.T)
        if few_rows(x):
            return cast(mx.array, super().as_linear(x))
        return _dense(self, x)


_FAST_CLASSES: dict[type, type] = {
    QuantizedLinear: FastQuantizedLinear,
    QuantizedEmbedding: FastQuantizedEmbedding,
}


def enable_fast_quantized(model: Module) -> int:
    """Switch the model's affine-quantized layers to the fast path in place; returns how many were switched.

    Only the class changes: parameters, their names and saved adapters stay exactly as they were.
    """
    switched = 0
    for _, module in model.named_modules():
        fast = _FAST_CLASSES.get(type(module))
        if fast is not None and getattr(module, "mode", "affine") == "affine" and module.get("biases") is not None:
            swap_class(module, fast)
            switched += 1
    return switched


def _fast_layers(model: Module) -> Iterator[Any]:
    for _, module in model.named_modules():
        if isinstance(module, FastQuantizedLinear | FastQuantizedEmbedding):
            yield module


def attach_decode_kernel(model: Module, kernel: Any) -> int:
    """Give the kernel to every fast layer it can compute (4 or 8 bits, float32 scales, groups of a multiple of 32);
    returns how many. The kernel is a plain attribute: parameters, adapters and saving are unaffected."""
    attached = 0
    for module in _fast_layers(model):
        if module.bits in (4, 8) and module.group_size % 32 == 0 and module["scales"].dtype == mx.float32:
            stash(module, "_decode_kernel", kernel)
            attached += 1
    return attached


def dense_weight_bytes(model: Module) -> int:
    """What caching every fast layer's dequantized float32 weight would cost."""
    return sum(m["weight"].shape[0] * m["weight"].shape[1] * 32 // m.bits * 4 for m in _fast_layers(model))


def cache_dense_weights(model: Module, budget_bytes: int) -> bool:
    """For inference on the CPU: keep float32 copies of the weights when they fit `budget_bytes`.

    They make multi-row products (training steps, prompt prefill) skip the dequantize; decode uses them only where our
    decode kernels could not be built (MLX's CPU quantized matrix-vector kernel is several times slower than an
    OpenBLAS float32 GEMV). The 4-bit weights stay the model's parameters (adapters and saving are unaffected); the
    copies are private attributes, not parameters. Linear layers keep theirs transposed, (input, output), where a
    one-row product is faster and a multi-row one the same; the output head keeps (vocabulary, hidden), faster for it.
    """
    if mx.default_device() != mx.cpu or dense_weight_bytes(model) > budget_bytes:
        return False
    for module in _fast_layers(model):
        w = module["weight"]
        rows, cols = w.shape[0], w.shape[1] * 32 // module.bits
        parts = [
            mx.dequantize(
                w[a:b],
                module["scales"][a:b],
                module["biases"][a:b],
                group_size=module.group_size,
                bits=module.bits,
                mode=module.mode,
            ).astype(mx.float32)
            for a, b in _row_chunks(rows, cols)
        ]
        dense = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
        if isinstance(module, FastQuantizedLinear):
            dense = mx.contiguous(dense.T)
        mx.eval(dense)
        stash(module, "_dense_weight", dense)
    return True


def use_float32_on_cpu(model: Module) -> bool:
    """On the CPU, half-precision math is emulated and slow: keep the model's float parameters in float32."""
    if mx.default_device() != mx.cpu:
        return False
    model.set_dtype(mx.float32)
    stash(model, "_float32_on_cpu", True)  # patches.fast_activations may then swap in the CPU SwiGLU and attention
    return True


def apply_fast_path(model: Module, wanted: bool | None) -> bool:
    """Apply the fast quantized path (and float32 on the CPU) when `wanted`, or by backend when None."""
    if not fast_path_on(wanted):
        log.info("fast path off: plain MLX-LM quantized layers")
        return False
    switched = enable_fast_quantized(model)
    as_float32 = use_float32_on_cpu(model)
    kernel = decode_kernel.load() if as_float32 else None
    decoded = attach_decode_kernel(model, kernel) + use_decode_layers(model, kernel) if kernel is not None else 0
    log.info(
        "fast path on: %d quantized layers use dequantize-then-GEMM; %d layers decode through our CPU kernels; CPU "
        "float32: %s",
        switched,
        decoded,
        as_float32,
    )
    return True
