"""The fast quantized path gives the plain path's results with bounded extra memory (CPU backend)."""

from __future__ import annotations

import logging
from typing import Any, cast

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx.nn.layers.quantized import quantize
from mlx.nn.utils import value_and_grad
from mlx_lm.models import qwen2
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers

from trainer.engine.fastpath import (
    FastQuantizedEmbedding,
    FastQuantizedLinear,
    apply_fast_path,
    cache_dense_weights,
    enable_fast_quantized,
)
from trainer.engine.inference import ModelSession
from trainer.engine.losses import training_loss
from trainer.engine.patches import fast_activations

pytestmark = pytest.mark.slow  # trains or builds kernels: seconds to minutes

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
    """`steps` Adam steps on one batch: plain MLX-LM (its quantized layers, SwiGLU, attention and `default_loss`), or
    the fast path as a run gets it (`apply_fast_path`: float32, CPU SwiGLU and attention; the CPU cross-entropy)."""
    model = _model(fast, dense)
    if fast:
        assert apply_fast_path(model, True)
    with fast_activations(model, fast) as patched:
        assert patched is fast
        return _steps(model, fast, steps)


def _steps(model: Any, fast: bool, steps: int) -> tuple[list[float], float]:
    optimizer = optim.Adam(learning_rate=1e-3)
    loss_and_grad = value_and_grad(model, training_loss(True, chunked=False) if fast else default_loss)
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


def test_cpu_silu_matches_mlx_and_its_gradient_too() -> None:
    from mlx.nn.layers.activations import silu

    from trainer.engine.cpu_math import fast_exp, fast_silu

    ours_silu = cast(Any, fast_silu)
    x = mx.linspace(-87.0, 87.0, 200_001)
    # against MLX's own exp, itself up to about 4e-6 off near the ends of the float32 range
    assert (mx.abs(fast_exp(x) / mx.exp(x) - 1) < 5e-6).all().item()
    x = mx.random.normal((8, 1024), key=mx.random.key(5)) * 6
    assert mx.allclose(ours_silu(x), silu(x), rtol=1e-5, atol=1e-5).item()
    ours = mx.grad(lambda a: ours_silu(a).sum())(x)
    theirs = mx.grad(lambda a: silu(a).sum())(x)
    assert mx.allclose(ours, theirs, rtol=1e-5, atol=1e-5).item()


def test_fast_activations_patch_mlx_lm_only_inside_their_context() -> None:
    from mlx_lm.models import activations, base

    from trainer.engine.cpu_math import fast_attention, fast_swiglu

    model = _model(True)
    assert apply_fast_path(model, True)
    assert getattr(qwen2, "swiglu") is activations.swiglu  # noqa: B009  # applying the fast path changes only this model's layers
    with fast_activations(model) as patched:
        assert patched
        assert getattr(qwen2, "swiglu") is fast_swiglu  # noqa: B009
        assert getattr(qwen2, "scaled_dot_product_attention") is fast_attention  # noqa: B009
    assert getattr(qwen2, "swiglu") is activations.swiglu  # noqa: B009
    assert getattr(qwen2, "scaled_dot_product_attention") is base.scaled_dot_product_attention  # noqa: B009
    with pytest.raises(RuntimeError), fast_activations(model):
        raise RuntimeError("a run that fails still restores mlx-lm")
    assert getattr(qwen2, "swiglu") is activations.swiglu  # noqa: B009


def test_an_untested_mlx_lm_gets_its_own_functions_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from mlx_lm.models import activations

    from trainer.engine import patches

    model = _model(True)
    assert apply_fast_path(model, True)
    monkeypatch.setattr(patches, "mlx_lm_version", lambda: "99.0")
    patches.patches_allowed.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=patches.__name__), fast_activations(model) as patched:
            assert not patched and getattr(qwen2, "swiglu") is activations.swiglu  # noqa: B009
        assert "99.0" in caplog.text and "not a version" in caplog.text
    finally:
        patches.patches_allowed.cache_clear()


def test_cpu_cross_entropy_matches_mlx_and_its_gradient_too() -> None:
    from mlx.nn.losses import cross_entropy

    from trainer.engine.losses import cpu_cross_entropy

    logits = mx.random.normal((3, 17, 5000), key=mx.random.key(2)) * 8
    targets = mx.random.randint(0, 5000, (3, 17), key=mx.random.key(3))
    weights = mx.random.uniform(shape=(3, 17), key=mx.random.key(4))  # a per-token cotangent, as a mask gives

    def loss_of(ce: Any) -> Any:
        return lambda x: (ce(x, targets) * weights).sum()

    ours, ours_grad = mx.value_and_grad(loss_of(cpu_cross_entropy))(logits)
    theirs, theirs_grad = mx.value_and_grad(loss_of(cross_entropy))(logits)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert mx.allclose(ours_grad, theirs_grad, rtol=1e-5, atol=1e-7).item()


@pytest.mark.parametrize(
    "rows,cols,mask",
    [
        (12, 12, "causal"),
        (5, 12, "causal"),
        (12, 12, "bool"),
        (12, 12, "bool per query head"),
        (12, 12, "additive"),
        (12, 12, None),
    ],
)
def test_cpu_attention_matches_mlx_and_its_gradient_too(rows: int, cols: int, mask: str | None) -> None:
    """Grouped-query heads (6 query heads over 2 key/value heads); a causal mask with fewer queries than keys is
    aligned to the last key, as when a KV cache holds earlier tokens."""
    from trainer.engine.cpu_math import fast_attention

    key = iter(mx.random.split(mx.random.key(7), 4))
    q = mx.random.normal((2, 6, rows, 32), key=next(key))
    k = mx.random.normal((2, 2, cols, 32), key=next(key))
    v = mx.random.normal((2, 2, cols, 32), key=next(key))
    masks: dict[str | None, Any] = {
        "causal": "causal",
        None: None,
        "bool": mx.random.uniform(shape=(rows, cols), key=next(key)) > 0.3,
        "bool per query head": mx.random.uniform(shape=(2, 6, rows, cols), key=mx.random.key(10)) > 0.3,
        "additive": mx.random.normal((rows, cols), key=mx.random.key(9)),
    }
    m = masks[mask]
    if mask is not None and mask.startswith("bool"):
        m = m | mx.eye(rows, cols, dtype=mx.bool_)  # every query sees at least one key

    def ours(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        return fast_attention(q, k, v, None, scale=0.17, mask=m)

    def theirs(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.17, mask=m)

    assert mx.allclose(ours(q, k, v), theirs(q, k, v), rtol=1e-5, atol=1e-5).item()
    cotangent = mx.random.normal((2, 6, rows, 32), key=mx.random.key(8))
    ours_grads = mx.vjp(ours, [q, k, v], [cotangent])[1]
    theirs_grads = mx.vjp(theirs, [q, k, v], [cotangent])[1]
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        assert mx.allclose(a, b, rtol=1e-4, atol=1e-5).item()
