"""The fast quantized path gives the plain path's results with bounded extra memory (CPU backend)."""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx.nn.layers.quantized import quantize
from mlx.nn.utils import value_and_grad
from mlx_lm.models import qwen2
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers

from trainer import blas
from trainer.fastpath import (
    FastQuantizedEmbedding,
    FastQuantizedLinear,
    apply_fast_path,
    cache_dense_weights,
    enable_fast_quantized,
)
from trainer.inference import ModelSession

VOCAB = 8192
#: fast-path peak / plain peak on this shape: 1.11 measured on the CPU (the extra is one copy of the logits, from
#: concatenating the head's row chunks); the bound leaves room for allocator noise
MAX_PEAK_RATIO = 1.2


def _model(fast: bool, dense: bool = False, lora_layers: int = 4, dropout: float = 0.0) -> Any:
    mx.random.seed(0)
    args = qwen2.ModelArgs.from_dict(
        {
            "model_type": "qwen2",
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "intermediate_size": 768,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "vocab_size": VOCAB,
            "tie_word_embeddings": True,
        }
    )
    model = qwen2.Model(args)
    quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    if fast:
        assert enable_fast_quantized(model) == 4 * 7 + 1  # seven projections per block, plus the tied head
    if dense:
        assert cache_dense_weights(model, 1 << 40)
    model.freeze()
    linear_to_lora_layers(model, lora_layers, {"rank": 16, "scale": 2.0, "dropout": dropout})
    return model


def _train(fast: bool, steps: int = 4, dense: bool = False) -> tuple[list[float], float]:
    model = _model(fast, dense)
    optimizer = optim.Adam(learning_rate=1e-3)
    loss_and_grad = value_and_grad(model, default_loss)
    batch = mx.random.randint(0, VOCAB, (4, 129), key=mx.random.key(1))
    lengths = mx.array([[0, 128]] * 4)
    losses = []
    for i in range(steps):
        if i == 1:
            mx.clear_cache()
            mx.reset_peak_memory()
        (loss, _), grads = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), optimizer.state)
        losses.append(loss.item())
    return losses, mx.get_peak_memory()


def test_fast_path_losses_equal_the_plain_path_with_bounded_memory() -> None:
    plain_losses, plain_peak = _train(fast=False)
    fast_losses, fast_peak = _train(fast=True)
    assert fast_losses == pytest.approx(plain_losses, rel=1e-4)
    assert plain_losses[-1] < plain_losses[0]  # it really trained
    assert fast_peak <= MAX_PEAK_RATIO * plain_peak, (fast_peak, plain_peak)


def test_dense_weight_copies_train_to_the_same_losses() -> None:
    plain_losses, _ = _train(fast=False, steps=3)
    dense_losses, _ = _train(fast=True, steps=3, dense=True)
    assert dense_losses == pytest.approx(plain_losses, rel=1e-4)


def test_fast_path_keeps_weights_4bit_and_parameter_names() -> None:
    plain, fast = _model(fast=False), _model(fast=True)
    assert {k: v.dtype for k, v in _flat(plain).items()} == {k: v.dtype for k, v in _flat(fast).items()}
    assert isinstance(fast.model.layers[0].mlp.gate_proj.linear, FastQuantizedLinear)  # inside LoRA
    assert isinstance(fast.model.embed_tokens, FastQuantizedEmbedding)


def _flat(model: Any) -> dict[str, mx.array]:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


def test_greedy_generation_is_identical_on_both_paths(tiny_model) -> None:
    outputs = []
    for fast in (False, True):
        session = ModelSession(fast_path=fast)
        session.load(str(tiny_model))
        outputs.append(session.generate("Write add_beta adding 3. " * 4, max_tokens=24).text)
    assert outputs[0] == outputs[1]


def test_workers_get_openblas_preloaded_when_it_is_installed() -> None:
    env = blas.blas_env({"LD_PRELOAD": "/x.so"})
    found = blas.find_openblas()
    if found is None:
        assert env == {"LD_PRELOAD": "/x.so"}
    else:
        assert env["LD_PRELOAD"] == f"{found}:/x.so"
        assert blas.blas_env(env) == env  # idempotent


def test_cpu_silu_matches_mlx_and_its_gradient_too() -> None:
    from mlx.nn.layers.activations import silu

    from trainer.cpu_math import fast_exp, fast_silu

    ours_silu = cast(Any, fast_silu)
    x = mx.linspace(-87.0, 87.0, 200_001)
    # against MLX's own exp, itself up to about 4e-6 off near the ends of the float32 range
    assert (mx.abs(fast_exp(x) / mx.exp(x) - 1) < 5e-6).all().item()
    x = mx.random.normal((8, 1024), key=mx.random.key(5)) * 6
    assert mx.allclose(ours_silu(x), silu(x), rtol=1e-5, atol=1e-5).item()
    ours = mx.grad(lambda a: ours_silu(a).sum())(x)
    theirs = mx.grad(lambda a: silu(a).sum())(x)
    assert mx.allclose(ours, theirs, rtol=1e-5, atol=1e-5).item()


def test_the_cpu_fast_path_routes_swiglu_through_it() -> None:
    from mlx_lm.models import qwen2 as qwen2_module

    from trainer.cpu_math import fast_swiglu

    model = _model(True)
    assert apply_fast_path(model, True) and getattr(qwen2_module, "swiglu") is fast_swiglu  # noqa: B009
