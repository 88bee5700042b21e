"""dpo and orpo on the tiny model, in real worker subprocesses and in process: each trains (its validation pairs
preferred more often), resumes bit for bit after a stop or a kill, cancels with its adapter saved, and a malformed
pair is refused before anything starts, naming its line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from tests.conftest import tiny_run_config
from tests.trainer.helpers import kill_resume_and_cancel, process_gone, train_in_process
from trainer import ConfigError, JobRunner, JobState, RunStore
from trainer.engine.tiny import write_synthetic_preferences
from trainer.lifecycle.events import ValReport
from trainer.planning.config import QLoRAConfig
from trainer.planning.preflight import prepare_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_preferences(tmp_path_factory.mktemp("pairs"))


def _settings(model: Path, data: Path, mode: str, **overrides: Any) -> dict[str, Any]:
    base = {"mode": mode, "learning_rate": 3e-3, "steps_per_eval": 10, "steps_per_report": 1, "save_every": 5}
    return tiny_run_config(model, data, **{**base, **overrides})


@pytest.mark.parametrize("mode", ["dpo", "orpo"])
def test_a_preference_run_learns_the_chosen_replies_and_resumes_bit_for_bit(
    mode: str, tiny_model: Path, pairs: Path, tmp_path: Path
) -> None:
    config = QLoRAConfig.parse(_settings(tiny_model, pairs, mode, iters=40, dropout=0.1))
    whole = train_in_process(config, tmp_path / "whole")
    vals = [e for e in whole.events if isinstance(e, ValReport)]
    assert vals[0].val_accuracy is not None and vals[-1].val_accuracy is not None
    if mode == "dpo":  # the policy starts as its reference: every margin is exactly 0
        assert vals[0].val_margin == 0.0 and vals[0].val_loss == pytest.approx(0.6931, abs=1e-4)
    assert vals[-1].val_accuracy >= 0.75 and vals[-1].val_margin > vals[0].val_margin  # type: ignore[operator]
    assert vals[-1].val_loss < vals[0].val_loss
    train_in_process(config, tmp_path / "parts", stop_after=13)
    after = train_in_process(config, tmp_path / "parts").losses()
    assert after == {it: whole.losses()[it] for it in range(14, 41)}  # exactly equal
    if mode == "dpo":
        assert (tmp_path / "parts" / "reference.safetensors").is_file()  # scored once, read back on resume


async def test_a_killed_dpo_worker_resumes_bit_for_bit_and_a_cancel_saves_the_adapter(
    tiny_model: Path, pairs: Path, tmp_path: Path
) -> None:
    settings = _settings(tiny_model, pairs, "dpo", iters=300, steps_per_eval=100)
    runs = await kill_resume_and_cancel(tmp_path, settings, kill_at=20, cancel_at=10)
    whole, resumed, stopped, pid = runs.whole, runs.resumed, runs.stopped, runs.killed_pid
    assert whole.state is JobState.SUCCEEDED and resumed.state is JobState.SUCCEEDED, resumed.error
    assert process_gone(pid) and runs.losses["resumed"] == runs.losses["whole"]  # every step's loss, exactly
    adapters = [dict(mx.load(str(Path(d.run_dir, "adapters", "adapters.safetensors")))) for d in (whole, resumed)]  # type: ignore[arg-type]
    assert all(mx.array_equal(adapters[0][k], adapters[1][k]).item() for k in adapters[0])
    assert stopped.state is JobState.CANCELLED and Path(stopped.run_dir, "adapters", "adapters.safetensors").is_file()
    assert resumed.metrics.last_val_accuracy is not None


def _write(folder: Path, records: list[Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    ("record", "said"),
    [
        ({"prompt": "p", "chosen": "a"}, "unknown record format"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "the same reply"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, 'needs "prompt"'),
        ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "b"}, "non-empty reply"),
    ],
)
def test_a_malformed_pair_is_refused_naming_its_line(
    record: dict[str, Any], said: str, tiny_model: Path, tmp_path: Path
) -> None:
    good = {"prompt": "Write add_one.", "chosen": "def add_one(x): return x + 1", "rejected": "no"}
    data = _write(tmp_path / "data", [good] * 6 + [record] + [good] * 2)
    with pytest.raises(ConfigError) as refused:
        prepare_run(QLoRAConfig.parse(_settings(tiny_model, data, "dpo")))
    assert "line 7" in str(refused.value) and said in str(refused.value)


def test_modes_and_data_must_agree(tiny_model: Path, tiny_data: Path, pairs: Path) -> None:
    with pytest.raises(ConfigError, match="trains on preference records, but .* holds chat records"):
        prepare_run(QLoRAConfig.parse(_settings(tiny_model, tiny_data, "dpo")))
    with pytest.raises(ConfigError, match="set mode to 'dpo' or 'orpo'"):
        prepare_run(QLoRAConfig.parse(_settings(tiny_model, pairs, "sft")))
    with pytest.raises(ConfigError, match="mode 'grpo' trains on tests records, but .* holds preference records"):
        prepare_run(QLoRAConfig.parse(_settings(tiny_model, pairs, "grpo")))
    with pytest.raises(ConfigError, match="so layerwise cannot apply"):
        QLoRAConfig.parse(_settings(tiny_model, pairs, "dpo", layerwise=True))
    sft = prepare_run(QLoRAConfig.parse(tiny_run_config(tiny_model, tiny_data, batch_size=2)))
    dpo = prepare_run(QLoRAConfig.parse(_settings(tiny_model, pairs, "dpo", batch_size=2)))
    assert dpo.memory is not None and sft.memory is not None
    assert dpo.memory.plan.batch_size == 4  # each pair's two replies in one pass


async def test_evaluate_scores_held_out_pairs_base_against_adapter(
    tiny_model: Path, pairs: Path, tmp_path: Path
) -> None:
    """A test split of pairs: evaluate reports each model's preference accuracy and the paired change."""
    import shutil
    import subprocess
    import sys

    data = tmp_path / "data"
    shutil.copytree(pairs, data)
    shutil.copy(data / "valid.jsonl", data / "test.jsonl")
    async with JobRunner(RunStore(tmp_path / "home")) as runner:
        run = await runner.submit(_settings(tiny_model, data, "dpo", iters=40))
        done = await runner.wait_until_done(run.id, 300)
    assert done.state is JobState.SUCCEEDED, done.error
    home = ["--home", str(tmp_path / "home")]
    scored = subprocess.run(
        [sys.executable, "-m", "trainer", *home, "evaluate", run.id, "--limit", "0"], capture_output=True, text=True
    )
    assert scored.returncode == 0, scored.stderr[-2000:]
    evaluation = json.loads(scored.stdout)
    base, adapter = (s["preference"]["accuracy"]["value"] for s in evaluation["scores"])
    change = next(c for c in evaluation["changes"] if c["metric"] == "preference accuracy")
    # the random tiny base already ranks the refusal lower in most pairs: the tuned model in all of them
    assert 0 <= base <= adapter == 1.0 and change["difference"]["low"] <= change["difference"]["value"], change
