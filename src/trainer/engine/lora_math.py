"""LoRA's low-rank branch computed in the activations' half precision instead of float32.

MLX-LM keeps `lora_a`/`lora_b` in float32, so in a bfloat16 (or float16) model every LoRA layer promotes its input
to float32, computes the (tokens x output) update in float32 and casts it back: more memory traffic than the base
layer's own output, forward and backward, and a float32 copy of each input kept for the backward pass. Here the two
small matrices are cast to the input's dtype (the scale folded into `lora_b`), as PEFT computes under half-precision
autocast: faster and smaller on a GPU (docs/benchmarks.md). The parameters, their float32 gradients and optimizer
state, and saved adapters are unchanged; float32 inputs (our CPU runs) take MLX-LM's own path.
"""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
from mlx_lm.tuner.lora import LoRALinear

from .patches import swap_class

HALF = (mx.bfloat16, mx.float16)


class HalfPrecisionLoRALinear(LoRALinear):
    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype not in HALF:
            return cast(mx.array, super().__call__(x))
        a = self.lora_a.astype(x.dtype)
        b = (self.scale * self.lora_b).astype(x.dtype)
        return cast(mx.array, self.linear(x) + (self.dropout(x) @ a) @ b)


def lora_in_half_precision(model: Any) -> int:
    """Switch the model's LoRA layers to `HalfPrecisionLoRALinear` in place (only the class changes); returns how
    many."""
    switched = 0
    for _, module in model.named_modules():
        if type(module) is LoRALinear:
            swap_class(module, HalfPrecisionLoRALinear)
            switched += 1
    return switched
