"""Held-out figures: bootstrap intervals and paired changes, how a generated body is scored, the loss per record
(batched and padded, equal to one record at a time), the split weighted by functions, and a repository's own tests
run with a generated body in place."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from trainer import ConfigError, build_dataset
from trainer.results.code_match import body_of, exact_match, reply_code, similarity
from trainer.results.intervals import paired_change, ratio_interval
from trainer.results.repo_tests import RepoTests

REAL_BODY = "total = x + y\nreturn total * 2\n"


def test_an_interval_brackets_its_figure_and_narrows_with_more_units() -> None:
    few = ratio_interval([1.0, 3.0, 2.0, 4.0], [1.0] * 4)
    many = ratio_interval([1.0, 3.0, 2.0, 4.0] * 25, [1.0] * 100)
    assert few.value == many.value == 2.5
    assert few.low < 2.5 < few.high and many.low < 2.5 < many.high
    assert many.high - many.low < few.high - few.low
    single = ratio_interval([5.0], [2.0], "exp")
    assert single.low == single.value == single.high == pytest.approx(2.718281828**2.5)


def test_a_change_is_better_only_when_its_paired_interval_leaves_zero_out() -> None:
    tokens = [10.0, 20.0, 30.0, 40.0, 50.0]
    base = ([20.0, 45.0, 60.0, 85.0, 100.0], tokens)
    lower_everywhere = ([n * 0.9 for n in base[0]], tokens)  # every file 10% lower loss: paired, it is clear
    change = paired_change("held-out loss", base, lower_everywhere, higher_is_better=False)
    assert change.verdict == "better" and change.difference.high < 0
    mixed = ([n * f for n, f in zip(base[0], (0.8, 1.2, 0.9, 1.1, 1.0), strict=True)], tokens)
    assert paired_change("held-out loss", base, mixed, higher_is_better=False).verdict == "no clear change"
    worse = paired_change("similarity", ([0.5] * 5, [1.0] * 5), ([0.4] * 5, [1.0] * 5), higher_is_better=True)
    assert worse.verdict == "worse" and worse.difference.value == pytest.approx(-0.1)


def test_a_generated_body_is_scored_after_normalization() -> None:
    reformatted = "total = x+y   # the sum\n\nreturn  total*2\n"
    assert exact_match(reformatted, REAL_BODY) and similarity(reformatted, REAL_BODY) == 1.0
    assert not exact_match("return x + y\n", REAL_BODY)
    assert 0.0 < similarity("return x + y\n", REAL_BODY) < 1.0
    assert similarity("while True: pass\n", REAL_BODY) < similarity("return x + y\n", REAL_BODY)
    assert not exact_match("return (\n", REAL_BODY)  # does not parse: never exact
    whole = '```python\ndef add(x, y):\n    """Twice the sum."""\n    total = x + y\n    return total * 2\n```'
    assert body_of(reply_code(whole), "add") == REAL_BODY  # the whole function repeated: its body, no docstring
    assert reply_code("```python\nreturn 1\n") == "return 1\n"  # an unclosed block runs to the end


def _package(root: Path) -> Path:
    (root / "calc").mkdir(parents=True)
    (root / "calc" / "__init__.py").write_text("")
    (root / "calc" / "ops.py").write_text(
        textwrap.dedent('''
        class Ops:
            def double_sum(self, x, y):
                """Twice the sum of x and y."""
                total = x + y
                return total * 2


        def square(x):
            """x times x."""
            return x * x
        ''').lstrip()
    )
    (root / "tests").mkdir()
    (root / "tests" / "__init__.py").write_text("")
    (root / "tests" / "test_ops.py").write_text(
        "import unittest\nfrom calc.ops import Ops, square\n\n\nclass T(unittest.TestCase):\n"
        "    def test_ops(self):\n        self.assertEqual(Ops().double_sum(2, 3), 10)\n"
        "        self.assertEqual(square(3), 9)\n"
    )
    return root


COMMAND = "python -m unittest discover -s tests -t ."


def test_the_repository_tests_judge_a_body_in_place_and_the_file_is_put_back(tmp_path: Path) -> None:
    repo = _package(tmp_path / "repo")
    out = tmp_path / "data"
    build_dataset(repo, out, fmt="instruct", seed=0)
    records = [
        json.loads(line)
        for split in ("train", "valid", "test")
        for line in (out / f"{split}.jsonl").read_text().splitlines()
    ]
    method = next(r for r in records if r["function"] == "double_sum")
    assert method["file"] == "calc/ops.py" and method["body_lines"] == [4, 5]
    with RepoTests(repo, COMMAND, timeout_s=60) as tests:
        original = (tests.copy / "calc" / "ops.py").read_text()
        assert tests.outcome_with("calc/ops.py", (4, 5), REAL_BODY) == "passed"
        assert tests.outcome_with("calc/ops.py", (4, 5), "return x + y\n") == "failed"
        assert tests.outcome_with("calc/ops.py", (4, 5), "return (\n") == "failed"
        assert (tests.copy / "calc" / "ops.py").read_text() == original
        with pytest.raises(ConfigError, match="not in the repository"):
            tests.outcome_with("../outside.py", (1, 1), "pass\n")
    assert not tests.copy.exists() and (repo / "calc" / "ops.py").read_text() == original


def test_a_test_command_that_fails_on_the_untouched_repository_is_refused(tmp_path: Path) -> None:
    repo = _package(tmp_path / "repo")
    with pytest.raises(ConfigError, match="does not pass on the untouched repository"):
        with RepoTests(repo, "python -c 'raise SystemExit(3)'", timeout_s=30):
            pass


def test_instruct_splits_are_weighted_by_functions(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for i in range(12):  # big files without functions, and small ones full of them
        (repo / f"big_{i}.py").parent.mkdir(parents=True, exist_ok=True)
        (repo / f"big_{i}.py").write_text(f'"""Data {i}."""\n' + f"TABLE_{i} = [\n" + "    1,\n" * 2000 + "]\n")
        functions = "".join(f'def f{i}_{j}(x):\n    """Doc {j}."""\n    return x + {j}\n\n\n' for j in range(5))
        (repo / f"small_{i}.py").write_text(functions)
    report = build_dataset(repo, tmp_path / "out", fmt="instruct", seed=0, held_out=0.1)
    records = {s.split: s.records for s in report.splits}
    assert records["valid"] > 0 and records["test"] > 0 and records["train"] >= 40
    with pytest.raises(ConfigError, match="held_out 0.6 is not a fraction"):
        build_dataset(repo, tmp_path / "out2", fmt="instruct", held_out=0.6)
