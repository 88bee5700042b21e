"""Exact resume: a run stopped at any step and continued from its checkpoint computes what the uninterrupted run did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from tests.conftest import tiny_run_config
from tests.trainer.helpers import train_in_process
from trainer.engine.tiny import write_synthetic_dataset
from trainer.lifecycle.checkpoints import checkpoints_dir, verify
from trainer.lifecycle.events import Checkpoint, Resumed
from trainer.planning.config import QLoRAConfig
from trainer.planning.replan import PlanChange, write_change

pytestmark = pytest.mark.slow
ITERS = 40
PER_EPOCH = 6  # 24 training records in batches of 4
SAVE_EVERY = 5


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("resume-data"), train=4 * PER_EPOCH, valid=8)


def _config(model: Path, data: Path, **overrides: Any) -> QLoRAConfig:
    settings = {
        "iters": ITERS,
        "save_every": SAVE_EVERY,
        "steps_per_report": 1,  # every step's loss is compared
        "steps_per_eval": 10,
        "val_batches": 2,
        "dropout": 0.1,  # LoRA dropout draws from MLX's random state: a resume must restore it
        **overrides,
    }
    return QLoRAConfig.parse(tiny_run_config(model, data, **settings))


def _adapter(run_dir: Path) -> dict[str, Any]:
    return dict(mx.load(str(run_dir / "adapters" / "adapters.safetensors")))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model: Path, small_data: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    run_dir = tmp_path_factory.mktemp("whole")
    return train_in_process(_config(tiny_model, small_data), run_dir).losses(), _adapter(run_dir)


@pytest.mark.parametrize(
    "stop_after",
    [8, 12, 15],
    ids=["mid-epoch", "epoch-boundary", "right-after-a-save"],
)
def test_a_resumed_run_continues_bit_for_bit(
    stop_after: int, uninterrupted: Any, tiny_model: Path, small_data: Path, tmp_path: Path
) -> None:
    whole_losses, whole_adapter = uninterrupted
    config = _config(tiny_model, small_data)
    first = train_in_process(config, tmp_path, stop_after=stop_after)
    saved = [e.iteration for e in first.events if isinstance(e, Checkpoint)]
    assert saved[-1] == stop_after  # the stop saved a checkpoint of the last finished step (or the save had)
    assert verify(checkpoints_dir(tmp_path) / f"{stop_after:07d}") is not None

    second = train_in_process(config, tmp_path)
    resumed = [e for e in second.events if isinstance(e, Resumed)]
    assert [r.iteration for r in resumed] == [stop_after]
    after = second.losses()
    assert sorted(after) == list(range(stop_after + 1, ITERS + 1))  # at least 20 steps after each resume point
    assert after == {it: whole_losses[it] for it in after}  # exactly equal, not approximately
    adapter = _adapter(tmp_path)
    assert adapter.keys() == whole_adapter.keys()
    assert all(mx.array_equal(adapter[k], whole_adapter[k]).item() for k in adapter)


def test_a_layerwise_run_resumes_bit_for_bit(tiny_model: Path, small_data: Path, tmp_path: Path) -> None:
    config = _config(tiny_model, small_data, layerwise=True, iters=30)
    whole = train_in_process(config, tmp_path / "whole").losses()
    train_in_process(config, tmp_path / "parts", stop_after=9)
    after = train_in_process(config, tmp_path / "parts").losses()
    assert after == {it: whole[it] for it in range(10, 31)}
    assert all(
        mx.array_equal(a, b).item()
        for a, b in zip(_adapter(tmp_path / "parts").values(), _adapter(tmp_path / "whole").values(), strict=True)
    )


def test_batches_are_padded_to_aligned_inputs_and_the_padding_is_masked() -> None:
    """MLX-LM caps a batch at max_seq_length (2047 inputs for 2048-token records), which GPU kernels run slowly."""
    from trainer.engine.batches import aligned
    from trainer.planning.device import input_alignment

    tokens, lengths = mx.ones((2, 2048), dtype=mx.int32), mx.array([[0, 2048], [0, 1000]])
    padded, same = aligned((tokens, lengths))
    assert padded.shape == (2, 2049) and (padded.shape[1] - 1) % input_alignment() == 0 and same is lengths
    assert padded[:, -1].tolist() == [0, 0] and mx.array_equal(padded[:, :2048], tokens).item()
    already = (mx.ones((1, 33), dtype=mx.int32), lengths[:1])
    assert aligned(already) is already


def test_inputs_are_aligned_to_128_where_cudnn_attention_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA: MLX's fused attention backward takes multiples of 128; the CPU keeps MLX-LM's 32 (its calibration)."""
    from trainer.engine.batches import aligned
    from trainer.planning import device

    assert device.input_alignment() == 32  # this machine: the CPU
    monkeypatch.setattr(device, "backend_kind", lambda: "cuda")
    assert device.input_alignment() == 128
    tokens, lengths = mx.ones((1, 1500), dtype=mx.int32), mx.array([[0, 1500]])
    assert aligned((tokens, lengths))[0].shape == (1, 1537)
    monkeypatch.setenv(device.ALIGN_ENV, "32")
    assert aligned((tokens, lengths))[0].shape == (1, 1505)


def test_a_run_of_token_passes_and_recomputed_blocks_trains_as_the_plain_run_and_resumes_bit_for_bit(
    tiny_model: Path, small_data: Path, tmp_path: Path
) -> None:
    """The plan search's plans run the same steps: gradient accumulation over passes of at most 64 tokens with one
    recomputed block gives the plain run's losses (float rounding apart), and a stop and resume change nothing."""
    plain = train_in_process(_config(tiny_model, small_data, dropout=0.0, iters=20), tmp_path / "plain").losses()
    config = _config(
        tiny_model, small_data, dropout=0.0, iters=20, pass_tokens=64, grad_checkpoint=True, checkpoint_blocks=1
    )
    whole = train_in_process(config, tmp_path / "whole").losses()
    assert whole == pytest.approx(plain, rel=1e-3) and whole != plain  # the same steps, summed in another order
    train_in_process(config, tmp_path / "parts", stop_after=8)
    after = train_in_process(config, tmp_path / "parts").losses()
    assert after == {it: whole[it] for it in range(9, 21)}


def test_a_packed_run_trains_in_fewer_steps_per_epoch_and_resumes_bit_for_bit(
    tiny_model: Path, small_data: Path, tmp_path: Path
) -> None:
    """Packing fills rows of max_seq_length tokens with whole records: fewer, full batches per epoch, the same
    shape every step; passes of one row with a recomputed block, stopped and resumed, continue exactly."""
    from mlx_lm.utils import load

    from trainer.engine.loop import SupervisedData
    from trainer.engine.mlx_backend import _run_data

    settings = {"packing": True, "pass_tokens": 128, "grad_checkpoint": True, "checkpoint_blocks": 1}
    config = _config(tiny_model, small_data, dropout=0.0, iters=12, **settings)
    tokenizer = load(str(tiny_model))[1]
    data = _run_data(config, tokenizer)
    assert isinstance(data, SupervisedData) and data.packed is not None
    assert data.batches_per_epoch < PER_EPOCH  # 24 short records fill fewer than 24 rows of 128 tokens
    shapes = {tuple(batch[0].shape) for _, (_, batch) in zip(range(8), data.training(0), strict=False)}
    assert shapes == {(4, 129)}
    whole = train_in_process(config, tmp_path / "whole").losses()
    assert whole[12] < whole[1]
    train_in_process(config, tmp_path / "parts", stop_after=5)
    after = train_in_process(config, tmp_path / "parts").losses()
    assert after == {it: whole[it] for it in range(6, 13)}


def test_a_run_switches_plan_at_the_recorded_step_and_resumes_bit_for_bit_on_either_side(
    tiny_model: Path, small_data: Path, tmp_path: Path
) -> None:
    """A plan change recorded for step 6 (as the first-steps check writes it): the start's plan until step 6, then
    passes of 64 tokens with a recomputed block; a run stopped before the switch or after it continues exactly."""
    change = PlanChange(
        from_step=6,
        settings={"pass_tokens": 64, "grad_checkpoint": True, "checkpoint_blocks": 1},
        measured_gb=1.0,
        predicted_gb=1.3,
        new_predicted_gb=0.9,
        reason="a test's",
    )
    config = _config(tiny_model, small_data, dropout=0.0, iters=20)
    plain = train_in_process(config, tmp_path / "plain").losses()
    for name in ("whole", "before", "after"):
        (tmp_path / name).mkdir()
        write_change(tmp_path / name, change)
    whole = train_in_process(config, tmp_path / "whole").losses()
    assert {it: whole[it] for it in range(1, 7)} == {it: plain[it] for it in range(1, 7)}  # the same plan to step 6
    assert whole == pytest.approx(plain, rel=1e-3) and whole != plain  # then the same steps, summed in another order
    for name, stop_after in (("before", 4), ("after", 9)):
        train_in_process(config, tmp_path / name, stop_after=stop_after)
        after = train_in_process(config, tmp_path / name).losses()
        assert after == {it: whole[it] for it in range(stop_after + 1, 21)}, name


class _Records:
    """Raw records as MLX-LM's datasets hold them (a dict each), tokenized by `process`."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {"messages": idx}

    def __len__(self) -> int:
        return len(self.lengths)

    def process(self, record: dict[str, Any]) -> tuple[list[int], int]:
        return [1] * self.lengths[record["messages"]], 0


def test_batches_hold_neighbours_in_token_length_so_mixed_lengths_pad_little() -> None:
    """MLX-LM sorts a CacheDataset by its raw records' len() (1 for a chat dict): batches in file order, 36% padding
    on mixed-length chats; by_token_length sorts by tokens, as iterate_batches means to."""
    import random

    from mlx_lm.tuner.datasets import CacheDataset

    from trainer.engine.batches import by_token_length, training_batches

    rng = random.Random(0)
    lengths = [rng.randint(100, 2048) for _ in range(64)]

    def padding(dataset: Any) -> float:
        real = slots = 0
        batches = training_batches(dataset, 4, 2048, seed=0)
        for _ in range(16):
            _, (tokens, rows) = next(batches)
            real += int(rows[:, 1].sum())
            slots += tokens.shape[0] * (tokens.shape[1] - 1)
        return 1 - real / slots

    assert padding(CacheDataset(_Records(lengths))) > 0.25  # MLX-LM's own: file order
    ordered = by_token_length(_Records(lengths))
    assert [ordered.itemlen(i) for i in range(3)] == lengths[:3]
    assert padding(ordered) < 0.06
