"""Coding tasks for grpo: {"prompt": text, "tests": code} (or the prompt as chat messages, under "prompt" or
"messages"), where `tests` is Python test code for the function the prompt asks for: top-level asserts and test_
functions, each one test; the rest of it (imports, helpers) runs first."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

from .preference_records import prompt_messages

LAYOUT = '{"prompt" (text) or "prompt"/"messages" (chat messages), "tests": "assert f(1) == 2\\n..."}'


def is_task(record: dict[str, Any]) -> bool:
    return "tests" in record and "chosen" not in record


@dataclass(frozen=True)
class TaskTests:
    """A task's tests as units that pass or fail one by one, and the code they need first."""

    setup: str
    units: tuple[str, ...]


def parse_tests(tests: object) -> TaskTests:
    """The suite of a record's `tests`; ValueError naming what is wrong."""
    if not isinstance(tests, str) or not tests.strip():
        raise ValueError('"tests" must be Python test code (asserts or test_ functions), as text')
    try:
        tree = ast.parse(tests)
    except SyntaxError as exc:
        raise ValueError(f'"tests" is not valid Python: {exc.msg} (its line {exc.lineno})') from None
    setup: list[str] = []
    units: list[str] = []
    for node in tree.body:
        code = ast.unparse(node)
        if isinstance(node, ast.Assert):
            units.append(code)
        elif isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            units.append(f"{code}\n{node.name}()")
        else:
            setup.append(code)
    if not units:
        raise ValueError('"tests" has no top-level assert or test_ function, so nothing could pass or fail')
    return TaskTests("\n".join(setup), tuple(units))


def task_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    try:
        return prompt_messages(record)
    except ValueError:
        raise ValueError(f'a task record needs "prompt" or "messages", besides "tests": {LAYOUT}') from None


def check_task(record: dict[str, Any]) -> None:
    """ValueError saying what is wrong with a task record, if anything."""
    task_messages(record)
    parse_tests(record["tests"])
