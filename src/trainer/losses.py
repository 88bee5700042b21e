"""A cross-entropy that never holds full-vocabulary float32 logits for the whole batch.

mlx-lm's `default_loss` computes `model(inputs)` (B x T x V logits) and the cross-entropy over all of it, keeping the
logits and their float32 softmax for the backward pass: for a 152k vocabulary at 2048 tokens that is gigabytes.
Here the head and the loss run over sequence chunks under `mx.checkpoint`, so the backward pass recomputes each
chunk's logits instead of keeping them. The result equals `default_loss` up to float rounding.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.nn.losses import cross_entropy

DEFAULT_CHUNK_TOKENS = 1024


def head_of(model: Any) -> Any | None:
    """The function from final hidden states to logits, for the mlx-lm model layouts we know; None otherwise."""
    inner = getattr(model, "model", None)
    if inner is None:
        return None
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        embed = getattr(inner, "embed_tokens", None)
        return embed.as_linear if embed is not None else None
    return model.lm_head


def make_chunked_loss(chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Any:
    def chunked_loss(model: Any, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        head = head_of(model)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        ntoks = mask.sum()
        if head is None:  # an unknown layout: fall back to the plain computation
            ce = cross_entropy(model(inputs), targets) * mask
            return ce.astype(mx.float32).sum() / ntoks, ntoks
        hidden = model.model(inputs)
        params = model.trainable_parameters()

        total = mx.array(0.0, dtype=mx.float32)
        for start in range(0, targets.shape[1], chunk_tokens):
            stop = start + chunk_tokens
            t, m = targets[:, start:stop], mask[:, start:stop]  # integer targets: closed over, never differentiated

            def chunk_ce(params: Any, h: mx.array, t: mx.array = t, m: mx.array = m) -> mx.array:
                model.update(params)
                return (cross_entropy(head(h), t) * m).astype(mx.float32).sum()

            total = total + mx.checkpoint(chunk_ce)(params, hidden[:, start:stop])
        return total / ntoks, ntoks

    return chunked_loss
