"""Gradient checkpointing of every transformer block, with the recomputation ordered after the forward pass.

mlx-lm's `grad_checkpoint` wraps each block in `mx.checkpoint`. Its recomputation depends only on the block's
inputs, so a scheduler is free to run it early, during the forward pass, and then every block's activations are
alive at once again. Here each block is an `mx.custom_function` whose VJP first makes its inputs depend on the
incoming cotangent (`mx.depends`), so a block is recomputed only when the backward pass reaches it.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten


def checkpoint_every_block(model: Any) -> int:
    """Checkpoint every block of `model.layers` (all instances of their class); returns how many blocks."""
    layers = getattr(model, "layers", None)
    if not layers:
        return 0
    block_type = type(layers[0])
    if getattr(block_type, "_ordered_checkpoint", False):
        return len(layers)
    forward = block_type.__call__

    def checkpointed(self: Any, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        flat_params = tree_flatten(self.trainable_parameters())
        if not flat_params:  # a frozen block below the LoRA layers needs no backward pass at all
            return forward(self, x, *args, **kwargs)  # type: ignore[no-any-return]
        names = [name for name, _ in flat_params]
        values = [value for _, value in flat_params]

        def run(flat: list[mx.array], h: mx.array) -> mx.array:
            self.update(tree_unflatten(list(zip(names, flat, strict=True))))
            return forward(self, h, *args, **kwargs)  # type: ignore[no-any-return]

        @mx.custom_function
        def block(flat: list[mx.array], h: mx.array) -> mx.array:
            return run(flat, h)

        @block.vjp
        def block_vjp(primals: Any, cotangent: mx.array, output: mx.array) -> Any:
            flat, h = primals
            ordered = mx.depends([*flat, h], [cotangent])  # recompute only once the backward pass is here
            _, grads = mx.vjp(lambda *arrays: [run(list(arrays[:-1]), arrays[-1])], list(ordered), [cotangent])
            return list(grads[:-1]), grads[-1]

        out: mx.array = block(values, x)
        return out

    block_type.__call__ = checkpointed
    block_type._ordered_checkpoint = True
    return len(layers)
