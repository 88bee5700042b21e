"""Evaluate a run (or a model with an adapter) against its base: what to run, and the scores, stored with the run.

On a dataset's test split (a built repository's held-out files): loss and perplexity, and for instruct data each
held-out function completed, every figure with a 95% bootstrap interval and each change base -> adapter with its own.

The MLX work is `engine/evaluate.py` in a child process; this module starts it, passes its progress lines on, and
writes the result to the run folder (`evaluation.json`), where run_status finds it.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..entrypoints import EVALUATE, python_module
from ..environment.process_env import mlx_child_environment
from ..errors import ConfigError
from ..lifecycle.store import RunStore
from ..planning.modelref import resolve_adapter_dir, resolve_model_dir
from ..planning.paths import PathPolicy
from .exports import run_with_adapter
from .held_out_scores import FunctionCompletion, HeldOutLoss, PreferenceAccuracy, TestsPassed
from .intervals import Change
from .sandbox import Outcome

EVALUATION_FILE = "evaluation.json"
HUMANEVAL_PROBLEMS = 164


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    adapter: str | None = None
    data: str | None = Field(None, description="Folder whose test.jsonl gives the loss (and the checker's prompts).")
    humaneval_limit: int = Field(HUMANEVAL_PROBLEMS, ge=0, le=HUMANEVAL_PROBLEMS)
    checker: str | None = Field(None, description="A Python file with score(prompt, reply) -> float.")
    checker_limit: int = Field(20, ge=1)
    max_tokens: int = Field(384, ge=16, le=4096)
    max_seq_length: int = 2048
    mask_prompt: bool = False
    timeout_s: float = Field(10.0, gt=0, le=120)
    completion_limit: int = Field(50, ge=0, le=2000, description="Held-out functions to complete (instruct data).")
    completion_functions: int = Field(0, ge=0, description="How many there are to complete (set from the data).")
    test_command: str | None = Field(None, description="Runs the repository's tests, e.g. 'python -m pytest -x -q'.")
    source: str | None = Field(None, description="The repository the data was built from (its report.json).")
    test_timeout_s: float = Field(300.0, gt=0, le=3600)

    def items_per_model(self) -> int:
        """Progress lines each model writes: its HumanEval problems, its held-out loss, its functions."""
        return self.humaneval_limit + (1 if self.data else 0) + self.completion_functions


class ProblemResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    task_id: str
    outcome: Outcome
    seconds: float


class ModelScores(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    humaneval_pass_at_1: float | None
    humaneval_passed: int
    humaneval_problems: list[ProblemResult]
    test_loss: float | None
    test_perplexity: float | None
    test_examples: int
    checker_score: float | None
    held_out: HeldOutLoss | None = None
    completion: FunctionCompletion | None = None
    preference: PreferenceAccuracy | None = None
    tests: TestsPassed | None = None
    seconds: float


class Evaluation(BaseModel):
    model_config = ConfigDict(frozen=True)

    spec: EvaluationSpec
    scores: list[ModelScores] = Field(description="The base first, then base + adapter.")
    changes: list[Change] = Field(
        default_factory=list, description="Held-out figures base -> adapter, each with its paired 95% interval."
    )
    seconds: float
    saved_to: str | None = None

    def summary(self) -> str:
        parts = []
        for s in self.scores:
            items = []
            if s.humaneval_pass_at_1 is not None:
                items.append(f"pass@1 {s.humaneval_pass_at_1:.3f} ({s.humaneval_passed}/{len(s.humaneval_problems)})")
            if s.held_out is not None:
                items.append(
                    f"held-out perplexity {s.held_out.perplexity} over {len(s.held_out.units)} {s.held_out.unit}s"
                )
            elif s.test_loss is not None:
                items.append(f"test loss {s.test_loss:.3f}")
            if s.preference is not None:
                items.append(f"preference accuracy {s.preference.accuracy} over {s.preference.pairs} pairs")
            if s.tests is not None:
                items.append(f"tests passed {s.tests.tests_passed} over {s.tests.tasks} coding tasks")
            if s.completion is not None:
                items.append(f"{s.completion.functions} functions: similarity {s.completion.similarity}")
            if s.checker_score is not None:
                items.append(f"checker {s.checker_score:.2f}")
            parts.append(f"{s.name}: " + ", ".join(items or ["nothing measured"]))
        changes = "".join(f"; {change}" for change in self.changes)
        return "; ".join(parts) + changes + f" ({self.seconds:.0f} s)"


def evaluation_spec(
    store: RunStore,
    *,
    run_id: str | None,
    model: str | None,
    adapter: str | None,
    data: str | None,
    models_root: Path | None = None,
    paths: PathPolicy | None = None,
    **settings: object,
) -> tuple[EvaluationSpec, Path | None]:
    """The spec for a run (its model, adapter and data) or a model (and adapter) named directly, and where to store
    the result (the run folder, or nowhere)."""
    folder: Path | None = None
    if run_id is not None:
        job, run_adapter = run_with_adapter(store, run_id)
        model, adapter, data, folder = (
            model or job.config.model,
            str(run_adapter),
            data or job.config.data,
            Path(job.run_dir),
        )
        settings.setdefault("max_seq_length", job.config.max_seq_length)
        settings.setdefault("mask_prompt", job.config.mask_prompt)
    if model is None:
        raise ConfigError("name a run (run_id), or a model (and optionally an adapter) to evaluate")
    model_dir = resolve_model_dir(model, models_root, paths)
    adapter_dir = (
        resolve_adapter_dir(str(paths.check(Path(adapter), "adapter") if paths else adapter)) if adapter else None
    )
    if data is not None:
        data = str(paths.check_folder(Path(data), "data folder") if paths else Path(data))
    checker = settings.get("checker")
    if isinstance(checker, str):
        checked = paths.check(Path(checker), "checker") if paths else Path(checker)
        if not checked.is_file():
            raise ConfigError(f"checker {checker!r} is not a file; pass a Python file defining score(prompt, reply)")
        settings["checker"] = str(checked)
    if data is not None:
        settings.update(_from_built_dataset(Path(data), settings, paths))
    spec = EvaluationSpec.model_validate(
        {"model": str(model_dir), "adapter": str(adapter_dir) if adapter_dir else None, "data": data, **settings}
    )
    return spec, folder


def _from_built_dataset(data: Path, settings: dict[str, object], paths: PathPolicy | None) -> dict[str, object]:
    """The held-out functions to complete, and for a test command the repository the dataset was built from."""
    test = data / "test.jsonl"
    functions = 0
    if test.is_file():
        with test.open(encoding="utf-8") as lines:
            functions = sum('"body_lines"' in line for line in lines)
    limit = settings.get("completion_limit")
    limit = limit if isinstance(limit, int) else EvaluationSpec.model_fields["completion_limit"].default
    found: dict[str, object] = {"completion_functions": min(functions, limit)}
    if settings.get("test_command"):
        report = data / "report.json"
        source = json.loads(report.read_text(encoding="utf-8")).get("source") if report.is_file() else None
        if not source or not functions:
            raise ConfigError(
                f"test_command needs data built by build_dataset with format 'instruct' (its report.json names the "
                f"repository, its test split the functions); {str(data)!r} is not"
            )
        found["source"] = str(paths.check_folder(Path(source), "source") if paths else Path(source))
    return found


def run_evaluation(spec: EvaluationSpec, save_in: Path | None, progress: Callable[[str], None]) -> Evaluation:
    """Evaluate in a child process, passing each progress line to `progress`; the result is saved in `save_in`."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        spec_file = Path(scratch) / "spec.json"
        spec_file.write_text(spec.model_dump_json(), encoding="utf-8")
        cmd = python_module(EVALUATE, str(spec_file))
        cmd += ["--save", str(save_in)] if save_in is not None else []
        out_file = Path(scratch) / "scores.json"
        tail: list[str] = []
        env = mlx_child_environment()
        # stdout to a file, stderr read as it comes: no pipe can fill up and stall the child
        with (
            out_file.open("w+", encoding="utf-8") as out,
            subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE, text=True, env=env
            ) as child,
        ):
            assert child.stderr is not None
            for line in child.stderr:
                if line.startswith("progress "):
                    progress(line[len("progress ") :].strip())
                else:
                    tail = (tail + [line.rstrip()])[-20:]
        out_text = out_file.read_text(encoding="utf-8")
    if child.returncode != 0:
        last = next((line for line in reversed(tail) if line.strip()), "")
        raise ConfigError(f"the evaluation stopped with status {child.returncode}: {last}")
    saved = stored_evaluation(save_in) if save_in is not None else None  # the child wrote it, atomically
    if saved is not None:
        return saved
    printed = json.loads(out_text.strip().splitlines()[-1])
    scores = [ModelScores.model_validate(s) for s in printed["scores"]]
    changes = [Change.model_validate(c) for c in printed["changes"]]
    return Evaluation(spec=spec, scores=scores, changes=changes, seconds=round(time.perf_counter() - start, 1))


def stored_evaluation(run_dir: Path) -> Evaluation | None:
    path = run_dir / EVALUATION_FILE
    return Evaluation.model_validate_json(path.read_text(encoding="utf-8")) if path.is_file() else None
