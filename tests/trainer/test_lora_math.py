"""LoRA in half precision: MLX-LM's results within half-precision rounding, its parameters and adapters unchanged."""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx.nn.layers.linear import Linear
from mlx.nn.layers.quantized import quantize
from mlx.nn.utils import value_and_grad
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers

from trainer.engine.lora_math import HalfPrecisionLoRALinear, lora_in_half_precision
from trainer.engine.tiny import TINY_ARGS


def _number(a: mx.array) -> float:
    return cast(float, a.item())


def _layer(dtype: mx.Dtype) -> LoRALinear:
    mx.random.seed(0)
    base = Linear(256, 512)
    base.set_dtype(dtype)
    layer = LoRALinear.from_base(base, r=16, scale=2.0)
    layer.lora_b = 0.05 * mx.random.normal((16, 512))  # MLX-LM starts it at zero: the branch would be invisible
    layer.freeze()
    layer.unfreeze(keys=["lora_a", "lora_b"])
    return layer


def _value_and_grads(layer: LoRALinear, x: mx.array) -> tuple[float, dict[str, mx.array]]:
    def loss(model: Any, x: mx.array) -> mx.array:
        return (model(x).astype(mx.float32) ** 2).mean()

    value, grads = value_and_grad(layer, loss)(layer, x)
    return _number(value), grads


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_a_half_precision_layer_gives_mlx_lm_s_loss_and_gradients_within_rounding(dtype: mx.Dtype) -> None:
    layer = _layer(dtype)
    x = mx.random.normal((4, 64, 256), key=mx.random.key(1)).astype(dtype)
    want_value, want = _value_and_grads(layer, x)
    assert lora_in_half_precision(layer) == 1
    value, got = _value_and_grads(layer, x)
    assert abs(value - want_value) <= 1e-3 * abs(want_value)
    for name in ("lora_a", "lora_b"):
        assert got[name].dtype == mx.float32  # the optimizer's state stays float32
        error = mx.abs(got[name] - want[name]).max() / mx.abs(want[name]).max()
        assert _number(error) < 2e-2, name
    assert layer.lora_a.dtype == layer.lora_b.dtype == mx.float32


def test_float32_inputs_take_mlx_lm_s_own_path_exactly() -> None:
    layer = _layer(mx.float32)
    x = mx.random.normal((2, 32, 256), key=mx.random.key(2))
    want = layer(x)
    lora_in_half_precision(layer)
    assert mx.array_equal(layer(x), want)


def test_a_bfloat16_model_trains_with_the_same_adapter_names_and_its_fused_weights_agree() -> None:
    mx.random.seed(0)
    args = qwen2.ModelArgs.from_dict({**TINY_ARGS, "vocab_size": 512})
    model = qwen2.Model(args)
    model.set_dtype(mx.bfloat16)
    quantize(model, group_size=64, bits=4)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 8, "scale": 2.0, "dropout": 0.0})
    names = sorted(dict(tree_flatten(model.trainable_parameters())))
    assert lora_in_half_precision(model) == 2 * 7  # seven projections per block
    assert sorted(dict(tree_flatten(model.trainable_parameters()))) == names
    optimizer = optim.Adam(learning_rate=1e-2)
    step = value_and_grad(model, default_loss)
    batch = mx.random.randint(0, 512, (2, 33), key=mx.random.key(3))
    lengths = mx.array([[0, 32], [0, 32]])
    losses = []
    for _ in range(6):
        (value, _), grads = step(model, batch, lengths)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(_number(value))
    assert losses[-1] < losses[0]  # it learns through the half-precision branch
    layer = model.layers[-1].self_attn.q_proj  # LoRA is on the last blocks
    assert isinstance(layer, HalfPrecisionLoRALinear)
    x = mx.random.normal((1, 8, TINY_ARGS["hidden_size"]), key=mx.random.key(4)).astype(mx.bfloat16)
    fused = layer.fuse(dequantize=True)  # MLX-LM's fuse, inherited: the update merged into the weight
    want = layer(x).astype(mx.float32)
    error = _number(mx.abs(fused(x).astype(mx.float32) - want).max())
    assert error < 0.05 * _number(mx.abs(want).max())
