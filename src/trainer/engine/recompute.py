"""Gradient checkpointing that holds in one compiled graph: a block's activations are recomputed in the backward pass.

`mx.checkpoint` makes its recomputation depend on the forward's outputs, which exist during the forward pass, so in
one compiled step the scheduler may recompute early and keep everything (on CUDA, checkpointing every block of the 7B
shape lowered the peak by 5%; docs/benchmarks.md). Here the recomputation depends on the cotangent, which exists only
once the backward pass reaches the block.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten


def recomputed(forward: Callable[..., mx.array]) -> Callable[..., mx.array]:
    """`forward(*arrays)`, its backward recomputing it once the cotangent exists."""
    function = mx.custom_function(forward)

    @function.vjp
    def backward(primals: tuple[mx.array, ...], cotangent: mx.array, output: mx.array) -> tuple[mx.array, ...]:
        return tuple(mx.vjp(forward, mx.depends(list(primals), [cotangent]), [cotangent])[1])

    return function  # type: ignore[return-value]  # custom_function is untyped


@cache
def recomputed_class(block_class: type) -> type:
    """The block's class, its call recomputed in the backward pass (a subclass: one block instance at a time)."""

    def __call__(self: Any, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        names, values = zip(*tree_flatten(self.trainable_parameters()), strict=True)

        def forward(x: mx.array, *params: mx.array) -> mx.array:
            self.update(tree_unflatten(list(zip(names, params, strict=True))))
            return block_class.__call__(self, x, *args, **kwargs)  # type: ignore[no-any-return]

        return recomputed(forward)(x, *values)

    return type(f"Recomputed{block_class.__name__}", (block_class,), {"__call__": __call__})
