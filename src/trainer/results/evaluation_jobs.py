"""An evaluation in the background: a detached child process that outlives the server (as runs do) and leaves
everything in its folder, so whoever looks next (this server, the next one, run_status) sees how far it got.

The folder holds `evaluation.spec.json` (what it runs), `evaluation.pid` (the child and its start time),
`evaluation.log` (its stderr: one `progress` line per problem) and, at the end, `evaluation.json` (written by the
child itself, atomically).
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from ..entrypoints import EVALUATE, python_module
from ..environment.process_env import mlx_child_environment
from ..errors import ConfigError
from ..lifecycle.leases import process_started, same_process_alive
from .evaluation import EVALUATION_FILE, Evaluation, EvaluationSpec, stored_evaluation

SPEC_FILE = "evaluation.spec.json"
PID_FILE = "evaluation.pid"
LOG_FILE = "evaluation.log"
#: the first word of every pid file `start_evaluation` writes: only a file that carries it is ours to read or remove
PID_RECORD_TAG = "mcp-local-evaluation"


class EvaluationState(BaseModel):
    model_config = ConfigDict(frozen=True)

    state: Literal["running", "succeeded", "failed"]
    done: int
    total: int
    folder: str
    evaluation: Evaluation | None = None
    error: str | None = None

    def summary(self) -> str:
        if self.evaluation is not None:
            return self.evaluation.summary()
        if self.state == "running":
            return f"evaluation running: {self.done} of {self.total} HumanEval problems done"
        return f"evaluation failed: {self.error}"


def _spec(folder: Path) -> EvaluationSpec | None:
    path = folder / SPEC_FILE
    return EvaluationSpec.model_validate_json(path.read_text(encoding="utf-8")) if path.is_file() else None


def pid_record_text(pid: int, started: float) -> str:
    return f"{PID_RECORD_TAG} {pid} {started}"


def _pid_record(folder: Path) -> tuple[int, float] | None:
    """The background evaluation `start_evaluation` recorded in `folder` (pid, start time), or None: no file, or not
    one we wrote (it lacks our tag)."""
    try:
        tag, pid, started = (folder / PID_FILE).read_text(encoding="utf-8").split()
        return (int(pid), float(started)) if tag == PID_RECORD_TAG else None
    except (OSError, ValueError):
        return None


def _alive(folder: Path) -> bool:
    record = _pid_record(folder)
    return record is not None and same_process_alive(*record)


def forget_ended(folder: Path, pid: int | None = None) -> None:
    """Remove `folder`'s pid file, by its record only: the one naming `pid` (the evaluation itself, as it ends), or,
    without `pid`, one whose process is gone. Anything else there is left as it is."""
    record = _pid_record(folder)
    if record is None or (pid is not None and record[0] != pid) or (pid is None and same_process_alive(*record)):
        return
    (folder / PID_FILE).unlink(missing_ok=True)


def evaluation_state(folder: Path) -> EvaluationState | None:
    """Where the evaluation kept in `folder` stands (None: there is none)."""
    spec = _spec(folder)
    done_file = stored_evaluation(folder)
    if spec is None and done_file is None:
        return None
    spec = spec or (done_file.spec if done_file else None)
    assert spec is not None
    total = spec.items_per_model() * (2 if spec.adapter else 1)
    log = (folder / LOG_FILE).read_text(encoding="utf-8", errors="replace") if (folder / LOG_FILE).is_file() else ""
    done = sum(line.startswith("progress ") for line in log.splitlines())
    if done_file is not None:
        forget_ended(folder)  # ended: its pid file would only mislead a later look
        return EvaluationState(state="succeeded", done=total, total=total, folder=str(folder), evaluation=done_file)
    if _alive(folder):
        return EvaluationState(state="running", done=done, total=total, folder=str(folder))
    last = next((line for line in reversed(log.splitlines()) if line.strip() and not line.startswith("progress ")), "")
    return EvaluationState(
        state="failed", done=done, total=total, folder=str(folder), error=last or "the evaluation process is gone"
    )


def start_evaluation(spec: EvaluationSpec, folder: Path) -> EvaluationState:
    """Start `spec` in the background, writing into `folder` (a finished evaluation there is replaced)."""
    if _alive(folder):
        raise ConfigError(f"an evaluation is running in {folder} already; wait for it (evaluate shows its progress)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EVALUATION_FILE).unlink(missing_ok=True)
    spec_file = folder / SPEC_FILE
    spec_file.write_text(spec.model_dump_json(), encoding="utf-8")
    with (folder / LOG_FILE).open("w", encoding="utf-8") as log:
        child = subprocess.Popen(
            python_module(EVALUATE, str(spec_file), "--save", str(folder)),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            env=mlx_child_environment(),
        )  # fmt: skip
    started = process_started(child.pid)
    (folder / PID_FILE).write_text(pid_record_text(child.pid, started or 0.0), encoding="utf-8")
    threading.Thread(target=child.wait, daemon=True).start()  # reaped here while this process lives
    state = evaluation_state(folder)
    assert state is not None
    return state
