"""The layerwise step: the same gradients as mlx-lm's one-graph step, less memory, and a real run through it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx.nn.utils import value_and_grad
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2
from mlx_lm.tuner.trainer import default_loss

from tests.conftest import tiny_run_config
from tests.trainer.test_fastpath import VOCAB, _model
from trainer import JobRunner, JobState, RunStore
from trainer.engine.layerwise import block_seeds, layerwise_value_and_grad, make_layerwise_eval_loss
from trainer.engine.losses import cross_entropy_for

pytestmark = pytest.mark.slow  # trains or builds kernels: seconds to minutes


def _seeded_call(seed: int) -> Any:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        mx.random.seed(seed)
        return qwen2.TransformerBlock.__call__(self, *args, **kwargs)

    return call


def _batch() -> tuple[mx.array, mx.array]:
    return mx.random.randint(0, VOCAB, (2, 257), key=mx.random.key(3)), mx.array([[0, 256]] * 2)


@pytest.mark.parametrize(
    ("fast", "dense", "lora_layers", "dropout", "compiled"),
    [
        (False, False, 4, 0.0, False),
        (True, False, 4, 0.0, True),
        (True, False, 2, 0.0, True),
        (True, True, 2, 0.0, True),
        (True, True, 3, 0.0, False),
        (False, False, 2, 0.3, True),
        (True, False, 3, 0.3, False),
    ],
)
def test_layerwise_gradients_equal_the_one_graph_step(
    fast: bool, dense: bool, lora_layers: int, dropout: float, compiled: bool
) -> None:
    """Frozen blocks below the adapters, compiled or not, each block with its own float32 weight copies
    (`dense_weights`), and LoRA dropout: the recomputation replays the forward pass's dropout masks, so even then the
    gradients are the one-graph step's."""
    model: Any = _model(fast, dense=dense, lora_layers=lora_layers, dropout=dropout)
    batch, lengths = _batch()
    mx.random.seed(7)
    if dropout:  # the reference seeds each LoRA block as the layerwise step does: one graph, the same masks
        blocks = model.model.layers[-lora_layers:]
        for block, seed in zip(blocks, block_seeds(lora_layers), strict=False):
            block.__class__ = type("Seeded", (type(block),), {"__call__": _seeded_call(seed)})
    (loss, ntoks), grads = value_and_grad(model, default_loss)(model, batch, lengths)
    mx.eval(loss, grads)
    for block in model.model.layers:
        block.__class__ = qwen2.TransformerBlock
    mx.random.seed(7)
    # the fast path's runs use the CPU cross-entropy (the reference keeps MLX's)
    ce = cross_entropy_for(fast)
    lw_loss, lw_ntoks, lw_grads = layerwise_value_and_grad(
        model, batch, lengths, compiled=compiled, pipelined=compiled, ce=ce
    )
    assert lw_loss.item() == pytest.approx(loss.item(), rel=1e-5) and lw_ntoks.item() == ntoks.item()
    expected, got = dict(tree_flatten(grads)), dict(tree_flatten(lw_grads))
    assert set(got) == set(expected) and len(got) == 14 * lora_layers
    for name, grad in expected.items():
        assert mx.allclose(got[name], grad, rtol=1e-3, atol=1e-5).item(), name


@pytest.mark.parametrize("fast", [False, True])
def test_the_layerwise_validation_loss_is_the_one_graph_loss(fast: bool) -> None:
    """Evaluation block by block (so it peaks no higher than a layerwise step) computes the same loss."""
    model: Any = _model(fast, dense=False, lora_layers=2, dropout=0.0)
    model.eval()
    batch, lengths = _batch()
    loss, ntoks = default_loss(model, batch, lengths)
    lw_loss, lw_ntoks = make_layerwise_eval_loss(cross_entropy_for(fast), chunk_tokens=100)(model, batch, lengths)
    assert lw_loss.item() == pytest.approx(loss.item(), rel=1e-5) and lw_ntoks.item() == ntoks.item()


async def test_a_layerwise_run_trains_like_the_default_step_and_saves_its_adapter(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    async with JobRunner(RunStore(tmp_path)) as runner:
        runs = {
            layerwise: await runner.submit(
                tiny_run_config(tiny_model, tiny_data, iters=30, steps_per_eval=15, save_every=15, layerwise=layerwise)
            )
            for layerwise in (True, False)
        }
        done = {key: await runner.wait_until_done(run.id, 300) for key, run in runs.items()}
        val = {key: runner.reports(run.id)[1] for key, run in runs.items()}
    assert all(d.state is JobState.SUCCEEDED for d in done.values()), [d.error for d in done.values()]
    assert val[True][-1].val_loss < 0.8 * val[True][0].val_loss
    # the same gradients, so the same learning curve up to float rounding
    for lw, default in zip(val[True], val[False], strict=True):
        assert lw.val_loss == pytest.approx(default.val_loss, rel=0.02)
    adapters = Path(done[True].adapter_path or "")
    assert (adapters / "adapters.safetensors").is_file() and Path(
        done[True].run_dir, "checkpoints", "0000015", "manifest.json"
    ).is_file()
