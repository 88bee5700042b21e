"""What an evaluation measures on held-out code, per model: loss and perplexity by file, function completion; each
figure with its 95% bootstrap interval (results/intervals.py), and the units behind it so the changes can be paired."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .intervals import Change, Interval, paired_change, ratio_interval
from .sandbox import Outcome


class UnitLoss(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(description="A held-out function (FILE:NAME:LINE), file, or 'record N' (data naming neither).")
    nll: float = Field(description="Summed negative log-likelihood of its scored tokens (nats).")
    tokens: int


class HeldOutLoss(BaseModel):
    model_config = ConfigDict(frozen=True)

    unit: Literal["function", "file", "record"] = Field(description="What the intervals resample.")
    records: int
    tokens: int
    loss: Interval = Field(description="Mean per-token loss (nats) on the test split.")
    perplexity: Interval
    units: list[UnitLoss]

    @classmethod
    def of(cls, units: list[UnitLoss], records: int, unit: Literal["function", "file", "record"]) -> HeldOutLoss:
        nll, tokens = [u.nll for u in units], [u.tokens for u in units]
        return cls(
            unit=unit, records=records, tokens=sum(tokens), loss=ratio_interval(nll, tokens),
            perplexity=ratio_interval(nll, tokens, "exp"), units=units,
        )  # fmt: skip


#: how much of each generated body evaluation.json keeps, to read what the model wrote
GENERATED_CHARS = 2000


class FunctionResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    file: str
    function: str
    exact: bool = Field(description="Equal to the real body after ast normalization.")
    similarity: float = Field(description="Token similarity to the real body, 0-1 (difflib ratio).")
    tests: Outcome | None = Field(None, description="The repository's tests with this body in place.")
    seconds: float
    generated: str = Field("", description=f"The body as written (its first {GENERATED_CHARS} characters).")


class FunctionCompletion(BaseModel):
    model_config = ConfigDict(frozen=True)

    functions: int
    exact_match: Interval
    similarity: Interval
    tests_passed: Interval | None = None
    results: list[FunctionResult]

    @classmethod
    def of(cls, results: list[FunctionResult]) -> FunctionCompletion:
        ones = [1.0] * len(results)
        tested = [r for r in results if r.tests is not None]
        return cls(
            functions=len(results),
            exact_match=ratio_interval([float(r.exact) for r in results], ones),
            similarity=ratio_interval([r.similarity for r in results], ones),
            tests_passed=ratio_interval([float(r.tests == "passed") for r in tested], [1.0] * len(tested))
            if tested
            else None,
            results=results,
        )


def held_out_changes(base: HeldOutLoss | None, adapter: HeldOutLoss | None) -> list[Change]:
    if base is None or adapter is None or [u.name for u in base.units] != [u.name for u in adapter.units]:
        return []
    b = ([u.nll for u in base.units], [float(u.tokens) for u in base.units])
    a = ([u.nll for u in adapter.units], [float(u.tokens) for u in adapter.units])
    return [
        paired_change("held-out loss", b, a, higher_is_better=False),
        paired_change("held-out perplexity", b, a, higher_is_better=False, transform="exp"),
    ]


def completion_changes(base: FunctionCompletion | None, adapter: FunctionCompletion | None) -> list[Change]:
    if base is None or adapter is None or base.functions != adapter.functions or not base.functions:
        return []
    ones = [1.0] * base.functions

    def pair(metric: str, values: list[float], other: list[float]) -> Change:
        return paired_change(metric, (values, ones), (other, ones), higher_is_better=True)

    changes = [
        pair("exact match", [float(r.exact) for r in base.results], [float(r.exact) for r in adapter.results]),
        pair("similarity", [r.similarity for r in base.results], [r.similarity for r in adapter.results]),
    ]
    if base.tests_passed is not None and adapter.tests_passed is not None:
        passed = [float(r.tests == "passed") for r in base.results]
        changes.append(pair("tests passed", passed, [float(r.tests == "passed") for r in adapter.results]))
    return changes


class UnitPreference(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(description="The record's 'function' (its pairs vary together), or 'record N'.")
    preferred: int = Field(description="Pairs whose chosen reply the model finds more likely than the rejected.")
    pairs: int


class PreferenceAccuracy(BaseModel):
    """Held-out preference pairs: how often the model gives the chosen reply the higher log-probability (summed over
    its tokens) than the rejected one, with its interval over the units."""

    model_config = ConfigDict(frozen=True)

    pairs: int
    accuracy: Interval
    units: list[UnitPreference]

    @classmethod
    def of(cls, units: list[UnitPreference]) -> PreferenceAccuracy:
        preferred, pairs = [float(u.preferred) for u in units], [float(u.pairs) for u in units]
        return cls(pairs=int(sum(pairs)), accuracy=ratio_interval(preferred, pairs), units=units)


def preference_changes(base: PreferenceAccuracy | None, adapter: PreferenceAccuracy | None) -> list[Change]:
    if base is None or adapter is None or [u.name for u in base.units] != [u.name for u in adapter.units]:
        return []
    b = ([float(u.preferred) for u in base.units], [float(u.pairs) for u in base.units])
    a = ([float(u.preferred) for u in adapter.units], [float(u.pairs) for u in adapter.units])
    return [paired_change("preference accuracy", b, a, higher_is_better=True)]


class TaskResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(description="The record's 'function', or 'task N'.")
    passed: int = Field(description="Tests its greedy reply passed, in the sandbox.")
    tests: int


class TestsPassed(BaseModel):
    """Held-out coding tasks (grpo's records): each answered greedily and run against its tests; the share of tests
    passed and of tasks passed whole, with their intervals over the tasks."""

    model_config = ConfigDict(frozen=True)

    tasks: int
    tests_passed: Interval
    tasks_passed: Interval
    results: list[TaskResult]

    @classmethod
    def of(cls, results: list[TaskResult]) -> TestsPassed:
        ones = [1.0] * len(results)
        return cls(
            tasks=len(results),
            tests_passed=ratio_interval([float(r.passed) for r in results], [float(r.tests) for r in results]),
            tasks_passed=ratio_interval([float(r.passed == r.tests) for r in results], ones),
            results=results,
        )


def tests_changes(base: TestsPassed | None, adapter: TestsPassed | None) -> list[Change]:
    """Paired by task: the share of tests passed (tests per task as weights) and of tasks passed whole."""
    if base is None or adapter is None or [r.name for r in base.results] != [r.name for r in adapter.results]:
        return []
    tests = [float(r.tests) for r in base.results]
    ones = [1.0] * len(tests)
    return [
        paired_change(
            "tests passed",
            ([float(r.passed) for r in base.results], tests),
            ([float(r.passed) for r in adapter.results], tests),
            higher_is_better=True,
        ),
        paired_change(
            "tasks passed",
            ([float(r.passed == r.tests) for r in base.results], ones),
            ([float(r.passed == r.tests) for r in adapter.results], ones),
            higher_is_better=True,
        ),
    ]
