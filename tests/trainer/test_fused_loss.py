"""The GPU's fused head and loss (engine/fused_loss.py) gives mlx-lm's loss and gradients, whole or in chunks, tied or
untied, quantized or not, inside a compiled step too (run here on the CPU backend: the arithmetic is the same)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx.nn.utils import value_and_grad
from mlx.utils import tree_flatten

from tests.trainer.test_plan_family import VOCAB, lora_model
from trainer.engine.fused_loss import fused_head_loss, head_weight
from trainer.engine.losses import head_of, make_default_loss


def _model(tied: bool, quantized: bool) -> Any:
    return lora_model(2, quantized, tie_word_embeddings=tied)


def _batch() -> tuple[mx.array, mx.array]:
    tokens = mx.random.randint(1, VOCAB, (3, 41), key=mx.random.key(5))
    return tokens, mx.array([[0, 40], [5, 33], [0, 12]])


def _fused(chunk_tokens: int) -> Any:
    def loss(model: Any, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        ntoks = mask.sum()
        total = fused_head_loss(head_of(model), model.model(inputs), targets, mask, chunk_tokens)
        assert total is not None
        return total / ntoks, ntoks

    return loss


def _loss_and_grads(model: Any, loss: Any, compiled: bool = False) -> tuple[float, dict[str, np.ndarray]]:
    def step(batch: mx.array, lengths: mx.array) -> Any:
        return value_and_grad(model, loss)(model, batch, lengths)

    (value, _), grads = (mx.compile(step, inputs=model.state) if compiled else step)(*_batch())
    mx.eval(value, grads)
    flat: list[tuple[str, Any]] = tree_flatten(grads)  # type: ignore[assignment]
    return value.item(), {k: np.array(v) for k, v in flat}


@pytest.mark.parametrize(("tied", "quantized"), [(True, True), (False, True), (False, False)])
def test_fused_loss_gives_the_default_loss_and_gradients(tied: bool, quantized: bool) -> None:
    model = _model(tied, quantized)
    reference = _loss_and_grads(model, make_default_loss())
    for chunk_tokens, compiled in ((1024, False), (16, False), (7, True)):  # one chunk; 8 chunks; uneven, compiled
        got = _loss_and_grads(model, _fused(chunk_tokens), compiled)
        assert got[0] == pytest.approx(reference[0], rel=1e-5)
        assert got[1].keys() == reference[1].keys() and got[1]
        for name, grad in reference[1].items():
            np.testing.assert_allclose(got[1][name], grad, rtol=2e-4, atol=1e-6, err_msg=name)


def test_a_head_with_a_bias_is_left_to_the_plain_loss() -> None:
    from mlx.nn.layers.linear import Linear

    head = Linear(8, 16, bias=True)
    assert head_weight(head, mx.zeros((2, 8))) is None
    assert head_weight(lambda x: x, mx.zeros((2, 8))) is None
    assert head_weight(Linear(8, 16, bias=False), mx.zeros((2, 8), dtype=mx.bfloat16)).dtype == mx.bfloat16


def test_no_vocabulary_sized_tensor_outlives_its_chunk_in_a_compiled_step() -> None:
    """The step's peak falls by more than one and a half copies of the whole logits: chunks run one after another,
    and the backward keeps only each token's gradient (were a chunk's logits or softmax kept for it, it would not)."""
    vocab, tokens = 16384, 1024
    peaks = {}
    for name, loss in (("default", make_default_loss()), ("fused", _fused(256))):
        model = lora_model(2, vocab_size=vocab, tie_word_embeddings=False)
        batch = mx.random.randint(1, vocab, (1, tokens + 1), key=mx.random.key(1))

        def step(batch: mx.array, lengths: mx.array, model: Any = model, loss: Any = loss) -> Any:
            return value_and_grad(model, loss)(model, batch, lengths)

        mx.eval(batch)
        mx.reset_peak_memory()
        (value, _), grads = mx.compile(step, inputs=model.state)(batch, mx.array([[0, tokens]]))
        mx.eval(value, grads)
        peaks[name] = mx.get_peak_memory()
        del model, grads
    logits_bytes = tokens * vocab * 4
    assert peaks["fused"] < peaks["default"] - 1.5 * logits_bytes, peaks  # measured: 2.0 copies less
