"""The head and cross-entropy fused over token chunks, for a GPU's one-graph step: no vocabulary-sized tensor is kept
for the backward pass.

On CUDA, `mx.checkpoint`'s chunks (the CPU's chunked loss) lowered no peak: the scheduler is free to recompute every
chunk as soon as the forward exists (docs/benchmarks.md). Here each chunk's gradient by hidden state is computed in
the forward pass, while its logits exist, and kept (tokens x hidden, small); the backward pass only scales it by the
cotangent. Each chunk waits for the one before (`mx.depends`), and the head's weight is dequantized once, for the loss
only. The work equals the unfused loss's: the head's product forward, and the softmax's product with the weight that
its backward computes. On the CPU one chunk's logits are alive at a time; on an H100 the peak still held 62% of the
plain loss's under MLX's default memory limit and 38% under the budget's (memory_estimate.GPU_FUSED_LOGITS_KEPT*).
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx
from mlx.nn.layers.base import Module

from .fastpath import dequantized_weight

#: tokens per chunk: a 152k vocabulary's half-precision logits and softmax at 1,024 tokens are 0.6 GB
GPU_LOSS_CHUNK_TOKENS = 1024
#: an experiment's chunk size (bench/gpu_plans.py)
CHUNK_ENV = "MCP_LOCAL_FUSED_LOSS_CHUNK"


def head_weight(head: Any, like: mx.array) -> mx.array | None:
    """The head's weight as one (vocabulary, hidden) matrix in `like`'s type, dequantized once after `like` exists;
    None for a head with a bias or of a kind we do not know (the caller falls back to the plain loss)."""
    module: Any = getattr(head, "__self__", head)  # a tied head is its embedding's bound `as_linear`
    if not isinstance(module, Module) or "bias" in module or "weight" not in module:
        return None
    weight: mx.array = dequantized_weight(module, after=like) if "scales" in module else module["weight"]
    return weight.astype(like.dtype)


def fused_cross_entropy(chunk_tokens: int = GPU_LOSS_CHUNK_TOKENS) -> Any:
    """summed(hidden (N, H), weight (V, H), targets (N,), mask (N,)): sum over rows of mask x cross-entropy of
    hidden @ weight.T, as mlx's `cross_entropy` computes it in the logits' type; differentiable in `hidden`."""

    @mx.custom_function
    def summed(hidden: mx.array, weight: mx.array, targets: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        total = mx.array(0.0, dtype=mx.float32)
        grads: list[mx.array] = []
        for start in range(0, hidden.shape[0], chunk_tokens):
            stop = start + chunk_tokens
            (rows,) = mx.depends([hidden[start:stop]], [total, *grads[-1:]])
            t, m = targets[start:stop], mask[start:stop]
            logits = rows @ weight.T
            picked = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
            total = total + ((mx.logsumexp(logits, axis=-1) - picked) * m).astype(mx.float32).sum()
            # d(loss)/d(logits) = softmax - one-hot, so d/d(rows) = softmax @ weight - weight[targets]
            weights = m[:, None].astype(logits.dtype)
            grads.append((mx.softmax(logits, axis=-1, precise=True) * weights) @ weight - weight[t] * weights)
        return total, mx.concatenate(grads, axis=0) if len(grads) > 1 else grads[0]

    @summed.vjp
    def summed_vjp(
        primals: tuple[mx.array, ...], cotangents: tuple[mx.array, ...], outputs: tuple[mx.array, ...]
    ) -> tuple[mx.array, ...]:
        hidden, weight, targets, mask = primals
        grad = (outputs[1] * cotangents[0].astype(outputs[1].dtype)).astype(hidden.dtype)
        return grad, mx.zeros_like(weight), mx.zeros_like(targets), mx.zeros_like(mask)

    return summed


def fused_head_loss(
    head: Any, hidden: mx.array, targets: mx.array, mask: mx.array, chunk_tokens: int | None = None
) -> mx.array | None:
    """The summed masked cross-entropy of `head(hidden)` over (B, T) targets, fused in token chunks; None where the
    head's weight cannot be had as one matrix."""
    weight = head_weight(head, hidden)
    if weight is None:
        return None
    chunk_tokens = chunk_tokens or int(os.environ.get(CHUNK_ENV) or GPU_LOSS_CHUNK_TOKENS)
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_mask = mask.reshape(-1).astype(hidden.dtype)
    total: mx.array = fused_cross_entropy(chunk_tokens)(rows, weight, targets.reshape(-1), flat_mask)[0]
    return total
