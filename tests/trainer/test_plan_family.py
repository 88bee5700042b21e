"""Each memory-saving plan trains to the unconstrained plan's losses and gradients (CPU backend, a tiny model):
recomputed blocks, gradient accumulation over passes of a token budget (the chunked loss: test_mlx_training)."""

from __future__ import annotations

import json
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

from trainer.engine.batches import token_passes
from trainer.engine.loop import QUEUE_PASSES_ENV, accumulating_step, fused_step, in_passes
from trainer.engine.losses import make_default_loss
from trainer.engine.patches import checkpointed_blocks
from trainer.engine.plan_switch import step_for
from trainer.engine.tiny import TINY_ARGS
from trainer.planning.config import QLoRAConfig

VOCAB = 512


def _model() -> Any:
    return lora_model()


def lora_model(lora_layers: int = 3, quantized: bool = True, **args: Any) -> Any:
    """The tiny model (TINY_ARGS with `args`), 4-bit unless not `quantized`, random LoRA on its last blocks."""
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs.from_dict({**TINY_ARGS, "vocab_size": VOCAB, **args}))
    if quantized:
        quantize(model, group_size=32, bits=4)
    model.freeze()
    linear_to_lora_layers(model, lora_layers, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    # LoRA's B starts at zero: random values make every gradient count
    lora: list[tuple[str, Any]] = tree_flatten(model.trainable_parameters())  # type: ignore[assignment]
    model.update(tree_unflatten([(name, mx.random.normal(p.shape) * 0.05) for name, p in lora]))
    mx.eval(model.parameters())
    return model


def _batch() -> tuple[mx.array, mx.array]:
    """Four examples of mixed length, padded to the longest (as MLX-LM's batches are), one with a masked prompt."""
    tokens = mx.random.randint(1, VOCAB, (4, 97), key=mx.random.key(3))
    lengths = mx.array([[0, 96], [0, 40], [10, 70], [0, 17]])
    keep = mx.arange(97)[None, :] < lengths[:, 1:] + 1
    return tokens * keep, lengths


def _loss_and_grads(loss: Any, blocks: int = 0) -> tuple[float, dict[str, np.ndarray]]:
    model = _model()
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


def test_recomputed_blocks_give_the_same_gradients() -> None:
    reference = _loss_and_grads(make_default_loss())
    _close(_loss_and_grads(make_default_loss(), blocks=2), reference)  # two of the three LoRA blocks
    _close(_loss_and_grads(make_default_loss(), blocks=99), reference)  # every one


def _train(step_for: Any, steps: int = 3, batch: Any = None) -> list[float]:
    model = _model()
    optimizer = optim.Adam(learning_rate=1e-2)
    step = step_for(model, optimizer)
    losses = []
    for _ in range(steps):
        value, _ = step(_batch() if batch is None else batch)
        losses.append(value.item())
    return losses


@pytest.mark.parametrize("queued", ["0", "1"])  # each pass awaited (the default), or queued (QUEUE_PASSES_ENV)
def test_gradient_accumulation_trains_as_the_whole_batch_does(queued: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(QUEUE_PASSES_ENV, queued)
    loss = make_default_loss()
    whole = _train(lambda m, o: fused_step(m, o, loss))
    for budget in (1, 128, 200):  # passes as in the test below
        assert _train(lambda m, o, k=budget: accumulating_step(m, o, loss, k)) == pytest.approx(whole, rel=1e-5)
    assert whole[-1] < whole[0]  # it trained


@pytest.mark.parametrize(
    ("budget", "passes", "widths"),
    [
        (1, [[17], [40], [70], [96]], [33, 65, 97, 97]),  # one example a pass, each cut to its own (aligned to 32)
        (128, [[17, 40], [70], [96]], [65, 97, 97]),  # 2 x 64 inputs fit; 2 x 96 do not
        (200, [[17, 40], [70, 96]], [65, 97]),  # 3 x 96 do not fit, 2 x 96 do
        (10_000, [[17, 40, 70, 96]], [97]),  # the whole batch
    ],
)
def test_passes_group_examples_by_length_within_the_token_budget(
    budget: int, passes: list[list[int]], widths: list[int]
) -> None:
    parts = token_passes(_batch(), budget)
    assert [np.array(p[1])[:, 1].tolist() for p in parts] == passes
    assert [p[0].shape[1] for p in parts] == widths


def _validation_peak(loss: Any, model: Any) -> tuple[float, int, float]:
    """(loss, tokens, memory above what was alive before) of one validation batch."""
    batch = _batch()
    mx.eval(batch)
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    value, toks = loss(model, *batch)
    mx.eval(value, toks)
    return value.item(), toks.item(), mx.get_peak_memory() - before


def test_validation_runs_in_the_plans_passes_with_the_same_loss_and_less_memory() -> None:
    """An H100 measured 11.87 GB for a plan of 2,048-token passes predicted at 10.60: its training passes fit, the
    validation batch of 4 x 2,048 tokens did not. Validation now takes the plan's passes."""
    model = _model()
    loss = make_default_loss()
    whole = _validation_peak(loss, model)
    passes = _validation_peak(in_passes(loss, 1), model)  # one example a pass
    assert passes[0] == pytest.approx(whole[0], rel=1e-5)
    assert passes[1] == whole[1]
    assert passes[2] < 0.6 * whole[2], (passes[2], whole[2])
    # and a run's plan of passes validates so (plan_switch.step_for)
    config = QLoRAConfig.parse({"model": "m", "data": "d", "pass_tokens": 8, "fast_path": False})
    _, run_validation = step_for(config, model, optim.Adam(learning_rate=1e-2))
    assert _validation_peak(run_validation, model)[2] < 0.6 * whole[2]


def test_validation_waits_for_the_step_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step returns with its backward pass still queued. On an H200 a validation built meanwhile stacked its
    buffers on the step's peak: 16.59 GB under a 15.5 GB limit, where every step had stayed under 16. Validation now
    waits for the device first (as the first-steps check does before it reads the peak)."""
    from trainer.engine import loop

    said: list[str] = []
    real = mx.synchronize

    def synchronize(*stream: Any) -> None:
        said.append("synchronize")
        real(*stream)

    monkeypatch.setattr(mx, "synchronize", synchronize)

    class Data:
        def validate(self, model: Any, val_loss: Any, progress: Any) -> None:
            said.append("validate")

    class Hooks:
        def evaluating(self) -> None:
            said.append("evaluating")

        def safe_point(self) -> None: ...

    loop._evaluate(_model(), Data(), make_default_loss(), Hooks(), 5)  # type: ignore[arg-type]
    assert said == ["synchronize", "evaluating", "validate"]


#: the Qwen2.5-Coder-7B shape of the H100 measurements (bench/memory_prediction.py's SHAPES), 4-bit
QWEN_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "quantization": {"bits": 4, "group_size": 64},
}


def search_on_cuda(monkeypatch: pytest.MonkeyPatch, lengths: list[int] | None = None, **settings: Any) -> Any:
    from trainer.planning import memory_plan, plan_search
    from trainer.planning.config import QLoRAConfig

    monkeypatch.setattr(memory_plan, "device_kind", lambda: "gpu")
    monkeypatch.setattr(memory_plan, "fast_path_on", lambda wanted: True)
    for module in (memory_plan, plan_search):
        monkeypatch.setattr(module, "input_alignment", lambda: 128)
    config = QLoRAConfig(model="m", data="d", num_layers=16, memory_budget_gb=16, fit_to_budget=True, **settings)
    longest = max(lengths) if lengths else None
    return memory_plan.check_memory(config, QWEN_7B, 16, longest, lengths)


def test_the_search_takes_the_fastest_plan_that_fits_not_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 7B shape at 1x2048 on CUDA with 16 GB: the fused loss (measured on an H100 under a 16 GB limit: 15.85 GB
    at 1.05x), not 4 recomputed blocks (15.89 GB at 0.94x) nor layerwise (7.7 GB at 0.72x), which fit too."""
    config, check = search_on_cuda(monkeypatch, batch_size=1, max_seq_length=2048)
    assert check.changes == ["chunked_loss=True"] and check.fits and config.recomputed_blocks == 0
    assert check.prediction.total_gb == pytest.approx(15.85, rel=0.02)
    speeds = {json.dumps(p.settings, sort_keys=True): p.relative_speed for p in check.plans if p.fits}
    assert speeds[json.dumps({"checkpoint_blocks": 4, "grad_checkpoint": True})] == pytest.approx(0.94, abs=0.01)
    assert max(speeds.values()) == pytest.approx(0.975) and min(speeds.values()) == pytest.approx(0.72)
    assert "the fastest of 3 plans that fit" in check.choice


def test_passes_are_predicted_faster_on_short_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 4: on long examples every plan is slow; on short ones a pass holds the whole batch (the same speed)."""
    _, long = search_on_cuda(monkeypatch, [2048] * 64, batch_size=4, max_seq_length=2048)
    _, short = search_on_cuda(monkeypatch, [400] * 60 + [2048] * 4, batch_size=4, max_seq_length=2048)

    def passes(check: Any) -> float:
        return next(p.relative_speed for p in check.plans if p.settings.get("pass_tokens") == 2048)

    assert passes(long) < 0.75 < passes(short)


def _records() -> list[tuple[list[int], int]]:
    """Mixed-length (tokens, prompt offset) records, one with a masked prompt."""
    tokens: list[list[int]] = mx.random.randint(1, VOCAB, (5, 96), key=mx.random.key(4)).tolist()  # type: ignore[assignment]
    return [(tokens[0][:96], 0), (tokens[1][:40], 0), (tokens[2][:70], 10), (tokens[3][:17], 0), (tokens[4][:9], 3)]


def _unpacked(records: list[tuple[list[int], int]]) -> tuple[mx.array, mx.array]:
    """The records as MLX-LM batches them: padded with zeros to one more than the longest."""
    width = max(len(ids) for ids, _ in records) + 1
    tokens = np.zeros((len(records), width), np.int32)
    for row, (ids, _) in enumerate(records):
        tokens[row, : len(ids)] = ids
    return mx.array(tokens), mx.array([[offset, len(ids)] for ids, offset in records])


def test_packed_rows_train_as_the_same_records_unpacked() -> None:
    """Block-diagonal attention and the layout's targets: the loss and gradients of the records unpacked."""
    from trainer.engine.losses import make_chunked_loss, make_packed_loss
    from trainer.engine.packing import extent, pack, packed_rows

    records = _records()
    rows = pack([extent(len(ids), 128) for ids, _ in records], 128 + 1)
    assert rows == [[0, 3, 4], [2, 1]]  # best fit, longest first: 97 + 18 + 10 and 71 + 41 of 129 positions
    packed = packed_rows([[records[i] for i in row] for row in rows], 128, 128)
    unpacked = _unpacked(records)

    def loss_and_grads(loss: Any, batch: tuple[mx.array, mx.array], blocks: int = 0) -> Any:
        model = _model()
        with checkpointed_blocks(model, blocks):
            (value, toks), grads = value_and_grad(model, loss)(model, *batch)
            mx.eval(value, grads)
        flat: list[tuple[str, Any]] = tree_flatten(grads)  # type: ignore[assignment]
        return value.item(), {k: np.array(v) for k, v in flat}, toks.item()

    reference = loss_and_grads(make_default_loss(), unpacked)
    assert reference[2] == 96 + 40 + 61 + 17 + 7  # targets trained: a record's tokens from its offset, as MLX-LM's
    for got in (loss_and_grads(make_packed_loss(None), packed), loss_and_grads(make_packed_loss(None), packed, 2)):
        assert got[2] == reference[2]
        _close(got[:2], reference[:2])
    chunked = loss_and_grads(make_chunked_loss(32), unpacked)
    _close(loss_and_grads(make_packed_loss(32), packed)[:2], chunked[:2])


def test_packed_rows_accumulate_over_passes_as_the_whole_batch() -> None:
    from trainer.engine.losses import make_packed_loss
    from trainer.engine.packing import extent, pack, packed_rows

    records = _records()
    rows = pack([extent(len(ids), 64) for ids, _ in records], 64 + 1)
    packed = packed_rows([[records[i] for i in row] for row in rows], 64, 64)
    assert packed[0].shape == (len(rows), 65) and len(rows) >= 3
    assert [p[0].shape[0] for p in token_passes(packed, 128)] == [2] * (len(rows) // 2) + [1] * (len(rows) % 2)
    whole = _train(lambda m, o: fused_step(m, o, make_packed_loss(None)), batch=packed)
    passes = _train(lambda m, o: accumulating_step(m, o, make_packed_loss(None), 128), batch=packed)
    assert passes == pytest.approx(whole, rel=1e-5)


def test_packing_refuses_a_model_that_builds_its_own_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that never asks the cache for its mask would let records see each other, one without rotary
    embeddings would see other positions: both refused, by name."""
    from trainer.engine.losses import make_packed_loss
    from trainer.engine.packing import extent, pack, packed_rows
    from trainer.errors import ConfigError

    model = _model()
    records = _records()
    rows = pack([extent(len(ids), 128) for ids, _ in records], 129)
    packed = packed_rows([[records[i] for i in row] for row in rows], 128, 128)
    own_mask = qwen2.Qwen2Model.__call__
    with monkeypatch.context() as patched:  # its own causal mask, whatever the cache
        patched.setattr(qwen2.Qwen2Model, "__call__", lambda self, inputs, cache=None: own_mask(self, inputs))
        with pytest.raises(ConfigError, match="packing=true is not supported for mlx_lm.models.qwen2; set it to false"):
            make_packed_loss(None)(model, *packed)
    del model.layers[0].self_attn["rope"]  # absolute positions would differ when a record moves along its row
    with pytest.raises(ConfigError, match="packing=true is not supported for mlx_lm.models.qwen2"):
        make_packed_loss(None)(model, *packed)


def test_the_additive_mask_a_gpu_gets_attends_as_the_boolean_one() -> None:
    from trainer.engine.packing import SegmentMask, extent, pack, packed_rows, segment_mask

    model = _model()
    records = _records()
    rows = pack([extent(len(ids), 128) for ids, _ in records], 129)
    tokens, layout = packed_rows([[records[i] for i in row] for row in rows], 128, 128)
    hidden = [
        model.model(tokens[:, :-1], cache=[SegmentMask(segment_mask(layout[:, 0], dtype))] * len(model.layers))
        for dtype in (None, mx.float32)
    ]
    np.testing.assert_allclose(np.array(hidden[0]), np.array(hidden[1]), rtol=1e-5, atol=1e-5)


def test_too_few_packed_rows_for_a_batch_is_refused_by_name() -> None:
    from trainer.engine.packing import PackedRows
    from trainer.errors import ConfigError

    rows = PackedRows([(list(range(1, 30)), 0)] * 6, max_seq_length=128, align=32)
    assert len(rows.rows) == 2  # six 30-position records: four to a 129-position row
    with pytest.raises(ConfigError, match="packing made 2 rows of 128 tokens, fewer than batch_size=4"):
        next(rows.batches(4, seed=0, start_step=0))


def test_packed_rows_at_16_gb_leave_room_for_the_accumulated_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed chat records at batch 4 on CUDA (rows of 2,048 tokens). One row a pass with 4 recomputed blocks: an H100
    measured 16.03 GB, where the prediction without the accumulation's two float32 gradient copies said 15.98; it
    now says over 16. The search takes the fused loss with 14 recomputed blocks in one pass, under MLX's limit (12,
    held at the limit, passed it by 1.09 GB from step 7: 16.59 GB on an H200 and an H100), never layerwise (no packed
    form)."""
    from trainer.planning import memory_plan

    config, check = search_on_cuda(monkeypatch, batch_size=4, max_seq_length=2048, packing=True, mask_prompt=True)
    update = {"grad_checkpoint": True, "checkpoint_blocks": 4, "pass_tokens": 2048, "chunked_loss": False}
    four = config.model_copy(update=update)
    predict, _ = memory_plan.run_predictor(four, QWEN_7B, None)
    assert 16 < predict(four)[1].total_gb == pytest.approx(16.03, rel=0.01)
    chosen = (config.pass_tokens, config.chunked_loss, config.recomputed_blocks, config.layerwise)
    assert chosen == (None, True, 14, False)
    assert check.prediction.total_gb < 16 and not any(p.settings.get("layerwise") for p in check.plans)


def _chat_lengths() -> list[int]:
    """The H100 benchmark's chat records (bench/gpu_plans.py): 64 of 100 to 2,048 tokens, spread evenly."""
    return sorted(int(100 + (2008 - 100) * i / 63) for i in range(64))


def test_on_a_gpu_the_choice_names_the_faster_packed_plan_for_mixed_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unpacked, these records' 16 GB plan measured 7,875 real tokens/s on an H100, packed 9,890 (1.26x): packing
    changes what a step holds, so the search does not turn it on, but its choice says so."""
    config, check = search_on_cuda(monkeypatch, _chat_lengths(), batch_size=4, max_seq_length=2048, mask_prompt=True)
    assert not config.packing and check.fits
    chosen = max((p for p in check.plans if p.fits), key=lambda p: p.relative_speed)
    hint = check.choice.split("; ", 1)[1]
    assert hint.startswith("on this GPU packing=True, chunked_loss=True, grad_checkpoint=True, checkpoint_blocks=14")
    speed = float(hint.split("about ")[1].split("x")[0])
    assert 1.1 * chosen.relative_speed <= speed < 1.26 * chosen.relative_speed  # it leaves out the compilations saved


def test_no_packing_hint_where_packing_is_slower_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.planning import memory_plan
    from trainer.planning.config import QLoRAConfig

    lengths = _chat_lengths()
    # the CPU: packed rows' masked attention costs more
    cpu = QLoRAConfig.parse(
        {"model": "m", "data": "d", "num_layers": 16, "batch_size": 4, "max_seq_length": 2048, "fast_path": True}
        | {"allow_over_budget": True}
    )
    assert "packing" not in (memory_plan.check_memory(cpu, QWEN_7B, 16, max(lengths), lengths)[1].choice or "x")
    _, check = search_on_cuda(monkeypatch, [2048] * 64, batch_size=4, max_seq_length=2048)  # one length: no padding
    assert check.choice and "packing" not in check.choice
    _, check = search_on_cuda(monkeypatch, lengths, batch_size=4, max_seq_length=2048, mode="dpo")  # refused there
    assert check.choice and "packing" not in check.choice


def test_a_gpu_fused_loss_is_predicted_as_measured_with_and_without_mlx_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused loss on CUDA (packed 4 x 2,048): with 9 recomputed blocks 24.21 GB under MLX's default limit (H100);
    under a 16 GB limit 20.53 GB with 9 blocks and 18.66 with 10 (above the limit: what the step holds); with 12 under
    the 15.5 GB limit a 16 GB budget sets, 16.59 GB from step 7 (an H200 and an H100: held at the limit, passed by what
    is allocated between eval's checks at 8,192 tokens a pass). So the search takes 14 blocks, under the limit."""
    from trainer.planning import memory_plan

    config, check = search_on_cuda(monkeypatch, batch_size=4, max_seq_length=2048, packing=True, mask_prompt=True)
    assert config.chunked_loss and config.recomputed_blocks == 14
    assert check.prediction.total_gb < 15.5

    def peak(budget: float, blocks: int) -> float:
        fused = config.model_copy(update={"memory_budget_gb": budget, "checkpoint_blocks": blocks})
        predict, _ = memory_plan.run_predictor(fused, QWEN_7B, None)
        return predict(fused)[1].total_gb

    assert peak(120, 9) == pytest.approx(24.21, rel=0.02)  # the bench's budget: MLX's default limit binds first
    assert peak(16.5, 9) == pytest.approx(20.53, rel=0.02) and peak(16.5, 10) == pytest.approx(18.66, rel=0.02)
    assert peak(16, 12) == pytest.approx(16.59, rel=0.01)
