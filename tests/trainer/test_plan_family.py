"""Each memory-saving plan trains to the unconstrained plan's losses and gradients (CPU backend, a tiny model):
the fused loss over the vocabulary, recomputed blocks, gradient accumulation."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.nn.layers.quantized import quantize
from mlx.nn.utils import value_and_grad
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import qwen2
from mlx_lm.tuner.utils import linear_to_lora_layers

from trainer.engine.batches import micro_batches
from trainer.engine.loop import accumulating_step, fused_step
from trainer.engine.losses import make_default_loss, make_fused_loss
from trainer.engine.patches import checkpointed_blocks

VOCAB = 512


def _model(tied: bool = False) -> Any:
    mx.random.seed(0)
    args = qwen2.ModelArgs.from_dict(
        {
            "model_type": "qwen2",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "vocab_size": VOCAB,
            "tie_word_embeddings": tied,
        }
    )
    model = qwen2.Model(args)
    quantize(model, group_size=32, bits=4)
    model.freeze()
    linear_to_lora_layers(model, 3, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    lora: list[tuple[str, Any]] = tree_flatten(model.trainable_parameters())  # type: ignore[assignment]  # LoRA's B starts at zero: make it count
    model.update(tree_unflatten([(name, mx.random.normal(p.shape) * 0.05) for name, p in lora]))
    mx.eval(model.parameters())
    return model


def _batch() -> tuple[mx.array, mx.array]:
    """Four examples of mixed length, padded to the longest (as MLX-LM's batches are), one with a masked prompt."""
    tokens = mx.random.randint(1, VOCAB, (4, 97), key=mx.random.key(3))
    lengths = mx.array([[0, 96], [0, 40], [10, 70], [0, 17]])
    keep = mx.arange(97)[None, :] < lengths[:, 1:] + 1
    return tokens * keep, lengths


def _loss_and_grads(loss: Any, blocks: int = 0, tied: bool = False) -> tuple[float, dict[str, np.ndarray]]:
    model = _model(tied)
    with checkpointed_blocks(model, blocks):
        (value, _), grads = value_and_grad(model, loss)(model, *_batch())
        mx.eval(value, grads)
    flat: list[tuple[str, Any]] = tree_flatten(grads)  # type: ignore[assignment]
    return value.item(), {k: np.array(v) for k, v in flat}


def _close(a: tuple[float, dict[str, np.ndarray]], b: tuple[float, dict[str, np.ndarray]]) -> None:
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        np.testing.assert_allclose(a[1][name], b[1][name], rtol=2e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("tied", [False, True])  # a head of its own, or the embedding's as_linear
def test_the_fused_loss_equals_the_plain_loss_and_its_gradients(tied: bool) -> None:
    reference = _loss_and_grads(make_default_loss(), tied=tied)
    _close(_loss_and_grads(make_fused_loss(chunk_tokens=48), tied=tied), reference)  # chunks across examples


def test_recomputed_blocks_give_the_same_gradients() -> None:
    reference = _loss_and_grads(make_default_loss())
    _close(_loss_and_grads(make_default_loss(), blocks=2), reference)  # two of the three LoRA blocks
    _close(_loss_and_grads(make_default_loss(), blocks=99), reference)  # every one


def _train(step_for: Any, steps: int = 3) -> list[float]:
    model = _model()
    optimizer = optim.Adam(learning_rate=1e-2)
    step = step_for(model, optimizer)
    losses = []
    for _ in range(steps):
        value, _ = step(_batch())
        losses.append(value.item())
    return losses


def test_gradient_accumulation_trains_as_the_whole_batch_does() -> None:
    loss = make_default_loss()
    whole = _train(lambda m, o: fused_step(m, o, loss))
    for micro in (1, 2):
        assert _train(lambda m, o, k=micro: accumulating_step(m, o, loss, k)) == pytest.approx(whole, rel=1e-5)
    assert whole[-1] < whole[0]  # it trained


def test_micro_batches_group_by_length_and_cut_padding() -> None:
    tokens, lengths = _batch()
    parts = micro_batches((tokens, lengths), 2)
    assert [np.array(p[1])[:, 1].tolist() for p in parts] == [[17, 40], [70, 96]]
    assert [p[0].shape[1] for p in parts] == [65, 97]  # 40 -> 64 inputs (a multiple of 32), and the batch's own
