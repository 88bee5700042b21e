"""Data parallelism with MLX's own process group (`mx.distributed`): each rank computes its share of a step's batch and
the gradients are summed over the group weighted by tokens, so a step equals one process's step on the whole batch.

MLX-LM's trainer averages the ranks' gradients instead; that equals the whole batch's gradient only when every rank
has as many tokens, which padded, length-sorted batches of code rarely give.
"""

from __future__ import annotations

import os
from typing import Any, cast

import mlx.core as mx
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..lifecycle.group import RANK_ENV
from .run_state import LoopState


def join_group(backend: str) -> Any:
    """The run's process group when the worker was started as a rank of one (`RANK_ENV` set), else None. Joining
    blocks until every rank has joined; later `mx.distributed.init()` calls (MLX-LM's) return the same group."""
    if RANK_ENV not in os.environ:
        return None
    return mx.distributed.init(strict=True, backend=backend)


def world_size() -> int:
    return int(mx.distributed.init().size())


def is_primary() -> bool:
    """Rank 0 (or no group): the rank that writes the run's events, checkpoints and adapter."""
    return int(mx.distributed.init().rank()) == 0


def sum_over_ranks(value: mx.array, toks: mx.array, grads: Any) -> tuple[mx.array, mx.array, Any]:
    """The whole batch's mean loss, its token count and the gradient of that mean, from each rank's own.

    `value` is a rank's mean loss over its `toks` tokens and `grads` the gradient of that mean, so the whole batch's
    gradient is sum(toks_r * grads_r) / sum(toks_r). MLX's `average_gradients` (one all-reduce for all the small
    LoRA gradients) divides its sum by the group size, which the weights make up for."""
    size = world_size()
    if size == 1:
        return value, toks, grads
    toks_f = toks.astype(mx.float32)
    total = mx.distributed.all_sum(toks_f)
    weight = toks_f * size / total
    summed = average_gradients(tree_map(lambda g: g * weight.astype(g.dtype), grads))
    loss = mx.distributed.all_sum(value.astype(mx.float32) * toks_f) / total
    return loss, total.astype(toks.dtype), summed


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank (every rank must call this)."""
    if world_size() == 1:
        return flag
    return bool(mx.distributed.all_sum(mx.array(int(flag))).item())  # the default stream: NCCL runs on the GPU


def from_primary(state: Any) -> Any:
    """Rank 0's values of a tree of arrays (or of a LoopState) on every rank: the others add zeros to a sum."""
    if world_size() == 1:
        return state
    if isinstance(state, LoopState):  # int32 parts: trained tokens pass 2**31 in long runs
        parts = mx.array([state.step, state.trained_tokens >> 30, state.trained_tokens & ((1 << 30) - 1)])
        step, high, low = (int(v) for v in from_primary(parts).tolist())  # type: ignore[union-attr]
        return LoopState(step=step, trained_tokens=(high << 30) | low)
    if isinstance(state, mx.array):
        return from_primary({"value": state})["value"]
    primary = is_primary()
    # by name: rank 0's tree was read from a file, the others' built in place, so their orders differ
    leaves = sorted(cast(list[tuple[str, mx.array]], tree_flatten(state)), key=lambda item: item[0])
    summed = [(k, mx.distributed.all_sum(a if primary else mx.zeros_like(a))) for k, a in leaves]
    mx.eval([a for _, a in summed])
    return tree_unflatten(summed)
