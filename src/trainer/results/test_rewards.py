"""Rewards from unit tests: a completion's code run against its task's tests in the sandbox (sandbox.py), each test
on its own, so the reward is the share of tests it passes; completions are scored in parallel."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..planning.task_records import TaskTests
from .code_match import code_blocks
from .sandbox import run_sandboxed

#: a completion's program: its code, the tests' setup, then each test caught on its own (a failure, an error or an
#: exit stops only that test); a line per passed test, so a program killed at its time limit keeps what it passed
#: (marked with a fresh nonce: a completion that prints such lines itself gains nothing)
_HARNESS = """
import json, sys
_units = json.loads({units!r})
_namespace = {{"__name__": "__main__"}}
try:
    exec(compile({code!r}, "solution.py", "exec"), _namespace)
    exec(compile({setup!r}, "tests.py", "exec"), _namespace)
except BaseException:
    sys.exit(0)
for _index, _unit in enumerate(_units):
    try:
        exec(compile(_unit, "tests.py", "exec"), _namespace)
    except BaseException:
        continue
    sys.stdout.write("{marker} " + str(_index) + "\\n")
    sys.stdout.flush()
"""
#: seconds and MB a completion's program may take
TIMEOUT_S = 3.0
MEMORY_MB = 512


@dataclass(frozen=True)
class TaskScore:
    passed: int
    total: int
    formatted: bool  # the reply put its code in a fenced block

    def reward(self, format_weight: float = 0.0) -> float:
        """The share of tests passed, plus `format_weight` for a fenced code block."""
        return self.passed / self.total + (format_weight if self.formatted else 0.0)

    @property
    def all_passed(self) -> bool:
        return self.passed == self.total


def completion_code(reply: str) -> str:
    """The code of a reply: its fenced blocks (a chat reply may split setup and function), or the whole reply."""
    blocks = code_blocks(reply)
    return "\n\n".join(blocks) if blocks else reply


def score_completion(reply: str, suite: TaskTests) -> TaskScore:
    marker = f"@@passed-{secrets.token_hex(8)}"
    units = json.dumps(list(suite.units))
    program = _HARNESS.format(units=units, code=completion_code(reply), setup=suite.setup, marker=marker)
    result = run_sandboxed(program, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)
    passed = {line.split()[1] for line in result.output.splitlines() if line.startswith(marker + " ")}
    return TaskScore(passed=len(passed), total=len(suite.units), formatted=bool(code_blocks(reply)))


def score_completions(replies: Sequence[str], suites: Sequence[TaskTests]) -> list[TaskScore]:
    """Each reply against its suite, several sandboxes at once (each is a process of its own)."""
    workers = max(1, min(len(replies), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(score_completion, replies, suites))
