"""grpo on the tiny model, in process and in real worker subprocesses: rewards from tests in the sandbox, a run that
raises its validation reward and resumes bit for bit after a stop or a worker kill, a cancel that saves the adapter,
and a malformed task refused before anything starts, naming its line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from tests.conftest import tiny_run_config
from tests.trainer.helpers import kill_resume_and_cancel, process_gone, train_in_process
from trainer import ConfigError, JobRunner, JobState, RunStore
from trainer.engine.grpo_loss import group_advantages
from trainer.engine.tiny import write_synthetic_tasks
from trainer.lifecycle.events import TrainReport, ValReport
from trainer.planning.config import QLoRAConfig
from trainer.planning.preflight import prepare_run
from trainer.planning.task_records import parse_tests
from trainer.results.test_rewards import score_completions

TESTS = (
    "import math\nassert add(1, 2) == 3\nassert add(-1, 1) == 0\ndef test_big():\n    assert add(10**6, 1) == 10**6 + 1"
)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_tasks(tmp_path_factory.mktemp("tasks"))


def _settings(model: Path, data: Path, **overrides: Any) -> dict[str, Any]:
    base = {"mode": "grpo", "learning_rate": 3e-3, "steps_per_eval": 10, "steps_per_report": 1, "save_every": 5}
    # one token a completion: about 4% of the tiny vocabulary is a program that runs (the tasks' first test), so
    # groups of 16 find that reward every step or two
    base |= {"completion_tokens": 1, "generations": 16, "batch_size": 2, "val_batches": -1}
    return tiny_run_config(model, data, **{**base, **overrides})


def test_tests_split_into_units_that_pass_one_by_one() -> None:
    suite = parse_tests(TESTS)
    assert suite.setup == "import math" and len(suite.units) == 3 and suite.units[2].endswith("test_big()")
    replies = [
        "```python\ndef add(a, b):\n    return a + b\n```",  # all three
        "def add(a, b):\n    return 3",  # only the first
        "def add(a, b):\n    while True:\n        pass",  # killed at its time limit
        "```python\nimport socket\nsocket.socket()\ndef add(a, b):\n    return a + b\n```",  # refused by the sandbox
        'print("@@passed 0")\nprint("@@passed 1")\nprint("@@passed 2")',  # cannot claim passes
        "def add(a, b:",  # not Python
    ]
    scores = score_completions(replies, [suite] * len(replies))
    assert [s.passed for s in scores] == [3, 1, 0, 0, 0, 0] and scores[0].all_passed
    assert scores[0].reward(0.1) == pytest.approx(1.1) and scores[1].reward(0.1) == pytest.approx(1 / 3)
    for bad, said in (("x = 1", "no top-level assert"), ("assert (", "not valid Python"), (3, "as text")):
        with pytest.raises(ValueError, match=said):
            parse_tests(bad)


def test_advantages_are_normalized_within_each_group() -> None:
    advantages = group_advantages([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2], 4)
    assert advantages[:4].mean() == pytest.approx(0, abs=1e-6) and advantages[0] > advantages[2] > advantages[1]
    assert list(advantages[4:]) == [0.0] * 4  # a group whose rewards are equal teaches nothing


@pytest.mark.slow
def test_a_grpo_run_raises_its_validation_reward_and_resumes_bit_for_bit(
    tiny_model: Path, tasks: Path, tmp_path: Path
) -> None:
    config = QLoRAConfig.parse(_settings(tiny_model, tasks, iters=24))
    whole = train_in_process(config, tmp_path / "whole")
    vals = [e for e in whole.events if isinstance(e, ValReport)]
    reports = [e for e in whole.events if isinstance(e, TrainReport)]
    assert vals[0].val_reward == 0.0 and vals[-1].val_reward is not None and vals[-1].val_reward >= 0.5
    assert vals[-1].val_loss == pytest.approx(1 - vals[-1].val_reward)
    assert all(r.reward is not None and r.kl is not None and r.completion_tokens for r in reports)
    assert any(r.reward for r in reports) and max(r.kl or 0 for r in reports) > 0  # it moved away from the base
    train_in_process(config, tmp_path / "parts", stop_after=13)
    after = train_in_process(config, tmp_path / "parts")
    assert after.losses() == {it: whole.losses()[it] for it in range(14, 25)}  # exactly equal
    rewards = {e.iteration: e.reward for e in after.events if isinstance(e, TrainReport)}
    assert rewards == {r.iteration: r.reward for r in reports if r.iteration > 13}  # the same completions sampled


@pytest.mark.slow
async def test_a_killed_grpo_worker_resumes_bit_for_bit_and_a_cancel_saves_the_adapter(
    tiny_model: Path, tasks: Path, tmp_path: Path
) -> None:
    settings = _settings(tiny_model, tasks, iters=30, steps_per_eval=15, generations=8)
    runs = await kill_resume_and_cancel(tmp_path, settings, kill_at=12, cancel_at=6)
    whole, resumed, stopped, pid = runs.whole, runs.resumed, runs.stopped, runs.killed_pid
    assert whole.state is JobState.SUCCEEDED and resumed.state is JobState.SUCCEEDED, resumed.error
    assert process_gone(pid) and runs.losses["resumed"] == runs.losses["whole"]  # every step's loss, exactly
    adapters = [dict(mx.load(str(Path(d.run_dir, "adapters", "adapters.safetensors")))) for d in (whole, resumed)]  # type: ignore[arg-type]
    assert all(mx.array_equal(adapters[0][k], adapters[1][k]).item() for k in adapters[0])
    assert stopped.state is JobState.CANCELLED and Path(stopped.run_dir, "adapters", "adapters.safetensors").is_file()
    assert resumed.metrics.last_val_reward is not None and resumed.metrics.last_reward is not None


@pytest.mark.parametrize(
    ("record", "said"),
    [
        ({"prompt": "Write f.", "tests": "x = 1"}, "no top-level assert"),
        ({"prompt": "Write f.", "tests": "assert f(1) =="}, "not valid Python"),
        ({"tests": "assert f() == 1"}, 'needs "prompt" or "messages"'),
    ],
)
def test_a_malformed_task_is_refused_naming_its_line(
    record: dict[str, Any], said: str, tiny_model: Path, tmp_path: Path
) -> None:
    good = {"prompt": "Write f returning 1.", "tests": "assert f() == 1"}
    folder = tmp_path / "data"
    folder.mkdir()
    lines = [good] * 6 + [record] + [good] * 2
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        prepare_run(QLoRAConfig.parse(_settings(tiny_model, folder)))
    assert "line 7" in str(refused.value) and said in str(refused.value)


def test_grpo_takes_tasks_and_plans_memory_for_each_prompts_completions(
    tiny_model: Path, tiny_data: Path, tasks: Path
) -> None:
    with pytest.raises(ConfigError, match="mode 'grpo' trains on tests records, but .* holds chat records"):
        prepare_run(QLoRAConfig.parse(_settings(tiny_model, tiny_data)))
    with pytest.raises(ConfigError, match="set mode to 'grpo'"):
        prepare_run(QLoRAConfig.parse({**_settings(tiny_model, tasks), "mode": "sft"}))
    with pytest.raises(ConfigError, match="so pass_tokens cannot apply"):
        QLoRAConfig.parse(_settings(tiny_model, tasks, pass_tokens=64))
    prepared = prepare_run(QLoRAConfig.parse(_settings(tiny_model, tasks, batch_size=2, generations=3)))
    assert prepared.memory is not None and prepared.memory.plan.batch_size == 6  # every completion in one pass


@pytest.mark.slow
async def test_evaluate_runs_held_out_tasks_against_their_tests_base_against_adapter(
    tiny_model: Path, tasks: Path, tmp_path: Path
) -> None:
    """A test split of coding tasks: evaluate answers each greedily with base and adapter, runs its tests in the
    sandbox, and reports the share of tests and of tasks passed with the paired changes."""
    import shutil
    import subprocess
    import sys

    data = tmp_path / "data"
    shutil.copytree(tasks, data)
    shutil.copy(data / "valid.jsonl", data / "test.jsonl")
    async with JobRunner(RunStore(tmp_path / "home")) as runner:
        run = await runner.submit(_settings(tiny_model, data, iters=10))
        done = await runner.wait_until_done(run.id, 300)
    assert done.state is JobState.SUCCEEDED, done.error
    home = ["--home", str(tmp_path / "home")]
    scored = subprocess.run(
        [sys.executable, "-m", "trainer", *home, "evaluate", run.id, "--limit", "0"], capture_output=True, text=True
    )
    assert scored.returncode == 0, scored.stderr[-2000:]
    evaluation = json.loads(scored.stdout)
    for scores in evaluation["scores"]:
        assert scores["tests"]["tasks"] == 8 and len(scores["tests"]["results"]) == 8
        assert all(r["tests"] == 2 and 0 <= r["passed"] <= 2 for r in scores["tests"]["results"])
        assert scores["held_out"] is None  # a task has no reply to score a loss on
    assert {c["metric"] for c in evaluation["changes"]} == {"tests passed", "tasks passed"}
