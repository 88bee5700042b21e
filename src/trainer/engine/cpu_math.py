"""Elementwise math that MLX's CPU backend computes slowly, rebuilt from the operations it computes fast.

MLX's CPU `exp` (and with it `sigmoid`, `silu`, `softmax` and `logsumexp`) is a scalar loop calling libm, several
times slower than numpy's, and the MLP, the loss and the attention softmax spend much of a CPU step in it
(docs/benchmarks.md). `fast_exp` below is the textbook vectorizable one (Cody-Waite range reduction, a degree-7
polynomial, the exponent set through the float's bits), compiled, within 1e-7 of the exact value (MLX's own: 1e-6).
On it: the MLP's SwiGLU, the attention softmax (`fast_attention`, multi-row float32 queries) and the cross-entropy
(`fast_cross_entropy`), each with its own VJP, each tested against MLX's values and gradients.
"""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx

from . import decode_kernel

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # ln 2 split so that n * _LN2_HI is exact in float32
_LN2_LO = -2.12194440e-4
_ROUNDER = 12582912.0  # 1.5 * 2**23: adding then subtracting it rounds a float32 of magnitude < 2**22 to an integer
_TAYLOR = [1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0]


def fast_exp(x: mx.array) -> mx.array:
    """exp(x) for float32 x, from multiplies, adds and bit operations only; 0 below float32's range (as for -inf)."""
    clipped = mx.clip(x, -87.0, 87.0)
    n = (clipped * _LOG2E + _ROUNDER) - _ROUNDER  # the nearest integer, without a (slower) round kernel
    r = clipped - n * _LN2_HI - n * _LN2_LO  # |r| <= ln(2) / 2
    p = mx.array(_TAYLOR[0], dtype=x.dtype)
    for c in _TAYLOR[1:]:
        p = p * r + c
    scale = mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)
    return mx.where(x < -87.0, 0.0, p * scale)


@mx.compile
def _exp_shifted(x: mx.array, shift: mx.array) -> mx.array:
    return fast_exp(x - shift)


@mx.custom_function
def fast_softmax(x: mx.array) -> mx.array:
    """softmax over the last axis (float32), its exp computed by `fast_exp`."""
    e = _exp_shifted(x, mx.stop_gradient(x.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


@fast_softmax.vjp
def _fast_softmax_vjp(primals: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


#: rows of logits per piece of the cross-entropy: its fused kernels still hold a few full-size intermediates, so
#: pieces keep them small (the whole-array version doubled the tiny test model's peak)
CROSS_ENTROPY_PIECE_ELEMENTS = 1 << 18


def row_ranges(rows: int, cols: int, max_elements: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of a rows x cols array, each at most `max_elements` (and at least one row)."""
    step = max(1, min(rows, max_elements // max(cols, 1)))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _row_pieces(rows: int, cols: int) -> list[tuple[int, int]]:
    return row_ranges(rows, cols, CROSS_ENTROPY_PIECE_ELEMENTS)


def _logsumexp_rows(logits: mx.array) -> mx.array:
    top = logits.max(axis=-1, keepdims=True)
    return top + mx.log(_exp_shifted(logits, top).sum(axis=-1, keepdims=True))


@mx.custom_function
def fast_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-token cross-entropy of float32 logits over the last axis (as `nn.losses.cross_entropy`, no options), its
    exp computed by `fast_exp` in pieces of rows; the backward recomputes the softmax from the logits."""
    flat = logits.reshape(-1, logits.shape[-1])
    pieces = [_logsumexp_rows(flat[a:b]) for a, b in _row_pieces(*flat.shape)]
    lse = (mx.concatenate(pieces) if len(pieces) > 1 else pieces[0]).reshape(*logits.shape[:-1], 1)
    return (lse - mx.take_along_axis(logits, targets[..., None], axis=-1)).squeeze(-1)


@mx.compile
def _cross_entropy_grad(logits: mx.array, lse: mx.array, targets: mx.array, cotangent: mx.array) -> mx.array:
    onehot = mx.arange(logits.shape[-1]) == targets
    return (fast_exp(logits - lse) - onehot) * cotangent


@fast_cross_entropy.vjp
def _fast_cross_entropy_vjp(
    primals: tuple[mx.array, mx.array], cotangent: mx.array, output: mx.array
) -> tuple[mx.array, mx.array]:
    logits, targets = primals
    lse = output[..., None] + mx.take_along_axis(logits, targets[..., None], axis=-1)
    flat = logits.reshape(-1, logits.shape[-1])
    lse, targets_, cotangent_ = lse.reshape(-1, 1), targets.reshape(-1, 1), cotangent.reshape(-1, 1)
    pieces = [
        _cross_entropy_grad(flat[a:b], lse[a:b], targets_[a:b], cotangent_[a:b]) for a, b in _row_pieces(*flat.shape)
    ]
    grad = mx.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    return grad.reshape(logits.shape), mx.zeros_like(targets)


def fast_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: mx.array | None = None,
) -> mx.array:
    """mlx-lm's `scaled_dot_product_attention` for float32 queries on the CPU, where MLX's fused kernel falls back to a
    composed one whose softmax uses the slow `exp`: one query row (decode) through our kernel where it was built,
    more rows composed here; anything else goes to mlx-lm's own."""
    if sinks is not None or hasattr(cache, "bits") or queries.dtype != mx.float32:
        return _mlx_lm_attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    if queries.shape[2] == 1:
        # one row sees every key: a "causal" mask aligned to the last key masks nothing
        kernel = decode_kernel.load() if mask is None or isinstance(mask, str) else None
        if kernel is None or keys.dtype != mx.float32 or values.dtype != mx.float32:
            return _mlx_lm_attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        return cast(mx.array, kernel.attention(queries, keys, values, scale))
    batch, heads, rows, dim = queries.shape
    kv_heads, cols = keys.shape[1], keys.shape[2]
    # grouped-query attention: query head h reads key/value head h // (heads // kv_heads), as MLX's kernel does
    q = (queries * scale).reshape(batch, kv_heads, heads // kv_heads, rows, dim)
    scores = q @ keys[:, :, None].swapaxes(-1, -2)
    if isinstance(mask, str):  # "causal", aligned to the last key as MLX's kernel does (a KV cache may hold more)
        mask = mx.arange(cols)[None] <= mx.arange(rows)[:, None] + (cols - rows)
    if mask is not None:
        scores = _masked(scores, _grouped_mask(mask, kv_heads))
    probabilities: mx.array = fast_softmax(scores)  # type: ignore[assignment]  # custom_function is untyped
    return (probabilities @ values[:, :, None]).reshape(batch, heads, rows, dim)


def _grouped_mask(mask: mx.array, kv_heads: int) -> mx.array:
    """A mask broadcastable to (batch, heads, rows, cols), as MLX's kernel takes it, laid out for grouped scores
    (batch, kv_heads, heads // kv_heads, rows, cols)."""
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(mask.shape[0], kv_heads, mask.shape[1] // kv_heads, *mask.shape[2:])


def _masked(scores: mx.array, mask: mx.array) -> mx.array:
    return mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask


def _mlx_lm_attention(*args: Any, **kwargs: Any) -> mx.array:
    from mlx_lm.models.base import scaled_dot_product_attention

    return scaled_dot_product_attention(*args, **kwargs)  # type: ignore[no-any-return]


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
