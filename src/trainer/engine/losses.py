"""The training losses: mlx-lm's `default_loss` with the CPU's fast cross-entropy, and a chunked one.

`make_default_loss` is mlx-lm's `default_loss` line for line with the cross-entropy as a parameter (mlx-lm's names
`nn.losses.cross_entropy` inside it). The chunked one never holds full-vocabulary float32 logits for the whole batch:
`default_loss` computes `model(inputs)` (B x T x V logits) and the cross-entropy over all of it, keeping the logits
and their float32 softmax for the backward pass: for a 152k vocabulary at 2048 tokens that is gigabytes. Here the
head and the loss run over sequence chunks under `mx.checkpoint`, so the backward pass recomputes each chunk's logits
instead of keeping them. The result equals `default_loss` up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx.nn.losses import cross_entropy

from .cpu_math import fast_cross_entropy
from .fused_loss import fused_head_loss

DEFAULT_CHUNK_TOKENS = 1024
CrossEntropy = Callable[[mx.array, mx.array], mx.array]
Loss = Callable[[Any, mx.array, mx.array], tuple[mx.array, mx.array]]


def cpu_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """`fast_cross_entropy` for float32 logits on the CPU (MLX's CPU `exp` is slow), MLX's own otherwise."""
    if logits.dtype == mx.float32 and mx.default_device() == mx.cpu:
        return fast_cross_entropy(logits, targets)  # type: ignore[return-value]  # custom_function is untyped
    return cross_entropy(logits, targets)


def cross_entropy_for(fast_path: bool) -> CrossEntropy:
    """The cross-entropy a run uses: the fast path's on the CPU when it is on, MLX's otherwise."""
    return cpu_cross_entropy if fast_path else cross_entropy


def make_default_loss(ce: CrossEntropy = cross_entropy) -> Loss:
    """mlx-lm's `default_loss`, its cross-entropy `ce`."""

    def default_loss(model: Any, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        ntoks = mask.sum()
        return (ce(model(inputs), targets) * mask).astype(mx.float32).sum() / ntoks, ntoks

    return default_loss


def training_loss(fast_path: bool, chunked: bool, packed: bool = False) -> Loss:
    """The loss a run's step differentiates (and, unpacked, its validation evaluates)."""
    ce = cross_entropy_for(fast_path)
    if packed:
        return make_packed_loss(DEFAULT_CHUNK_TOKENS if chunked else None, ce)
    return make_chunked_loss(ce=ce) if chunked else make_default_loss(ce)


def make_packed_loss(chunk_tokens: int | None, ce: CrossEntropy = cross_entropy) -> Loss:
    """The loss of packed rows (engine/packing.py): each record attends only to itself; the trained targets are the
    layout's. Equal to `default_loss` (or the chunked one) over the same records unpacked, up to rounding."""
    from ..errors import ConfigError
    from .packing import SegmentMask, segment_mask

    def packed_loss(model: Any, batch: mx.array, layout: mx.array) -> tuple[mx.array, mx.array]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        trained = layout[:, 1]
        # the CPU's attention (ours and MLX's) takes booleans as they are; a GPU's, an additive mask of its type
        dtype = None if mx.default_device() == mx.cpu else model.model.embed_tokens(inputs[:1, :1]).dtype
        masks = SegmentMask(segment_mask(layout[:, 0], dtype))
        head = head_of(model)
        # positions run on across a row: equal only under rotary embeddings (traced once per shape, so checked here)
        rotary = hasattr(getattr(model.layers[0], "self_attn", None), "rope")
        hidden = model.model(inputs, cache=[masks] * len(model.layers)) if head is not None and rotary else None
        if hidden is None or not masks.asked:  # a model building its own mask would let records see each other
            raise ConfigError(f"packing=true is not supported for {type(model).__module__}; set it to false")
        ntoks = trained.sum()
        return _head_loss(model, head, hidden, targets, trained, chunk_tokens, ce) / ntoks, ntoks

    return packed_loss


def _head_loss(
    model: Any,
    head: Any,
    hidden: mx.array,
    targets: mx.array,
    mask: mx.array,
    chunk_tokens: int | None,
    ce: CrossEntropy,
) -> mx.array:
    """The summed cross-entropy of the head's logits over the masked targets, in sequence chunks when `chunk_tokens`
    is set: on the CPU the backward recomputes each chunk's logits; on a GPU the head and loss are fused
    (fused_loss.py), where checkpointed chunks lowered no peak."""
    if chunk_tokens is None:
        return (ce(head(hidden), targets) * mask).astype(mx.float32).sum()
    if mx.default_device() != mx.cpu and (fused := fused_head_loss(head, hidden, targets, mask)) is not None:
        return fused
    params = model.trainable_parameters()
    total = mx.array(0.0, dtype=mx.float32)
    for start in range(0, targets.shape[1], chunk_tokens):
        stop = start + chunk_tokens
        t, m = targets[:, start:stop], mask[:, start:stop]  # integer targets: closed over, never differentiated

        def chunk_ce(params: Any, h: mx.array, t: mx.array = t, m: mx.array = m) -> mx.array:
            model.update(params)
            return (ce(head(h), t) * m).astype(mx.float32).sum()

        total = total + mx.checkpoint(chunk_ce)(params, hidden[:, start:stop])
    return total


def head_of(model: Any) -> Any | None:
    """The function from final hidden states to logits, for the mlx-lm model layouts we know; None otherwise."""
    inner = getattr(model, "model", None)
    if inner is None:
        return None
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        embed = getattr(inner, "embed_tokens", None)
        return embed.as_linear if embed is not None else None
    return model.lm_head


def make_chunked_loss(chunk_tokens: int = DEFAULT_CHUNK_TOKENS, ce: CrossEntropy = cross_entropy) -> Loss:
    def chunked_loss(model: Any, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        head = head_of(model)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        ntoks = mask.sum()
        if head is None:  # an unknown layout: fall back to the plain computation
            per_token = ce(model(inputs), targets) * mask
            return per_token.astype(mx.float32).sum() / ntoks, ntoks
        return _head_loss(model, head, model.model(inputs), targets, mask, chunk_tokens, ce) / ntoks, ntoks

    return chunked_loss


def completion_mask(tokens: mx.array, lengths: mx.array) -> mx.array:
    """Which target columns are completion tokens (from the prompt's end to the row's length)."""
    predicted = mx.arange(1, tokens.shape[1])  # the index of the token each target column predicts
    return mx.logical_and(predicted >= lengths[:, 0:1], predicted < lengths[:, 1:])


def token_logps(model: Any, tokens: mx.array, ce: CrossEntropy, temperature: float = 1.0) -> mx.array:
    """Each target token's log-probability under the model at `temperature` (the distribution grpo samples)."""
    logits = model(tokens[:, :-1])
    if temperature != 1.0:
        logits = logits / temperature
    return -ce(logits, tokens[:, 1:]).astype(mx.float32)
