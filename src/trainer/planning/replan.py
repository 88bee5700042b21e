"""The first-steps check of a fitted plan: after its first steps, a run of `fit_to_budget` compares MLX's measured
peak with the prediction for the batches it has seen; off by more than a tenth (the calibration is an estimate on
Metal, and any model can surprise it), or by less but enough to take the run's longest batch over the budget, the plan
search runs again with every prediction scaled by that error, once.

The change applies from a step on, and is recorded in the run's folder before that step runs, so a resumed run
follows the same plans at the same steps (exact resume); the plans are of the same step (plan_search.py), so the
run's losses do not depend on it beyond float rounding.

runs/<id>/replan.json    the change: from which step, which settings, measured and predicted peaks, why
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from .config import QLoRAConfig
from .memory_plan import run_predictor
from .plan_search import explain, search

log = logging.getLogger(__name__)
RECORD = "replan.json"
#: steps measured before deciding: the first compiles the step, the next reach its steady peak
FIRST_STEPS = 3
#: how far the measured peak may be from the prediction before the plan is chosen again
TOLERANCE = 0.10
#: the settings the plan search chooses, and their unconstrained values (where it starts from again)
PLAN_FIELDS: dict[str, Any] = {
    "grad_checkpoint": False,
    "checkpoint_blocks": None,
    "pass_tokens": None,
    "chunked_loss": False,
    "layerwise": False,
}


class PlanChange(BaseModel):
    """A plan chosen again after the first steps, in force from the step after `from_step`."""

    from_step: int
    settings: dict[str, Any] = Field(description="The plan's settings that changed, as config fields.")
    measured_gb: float = Field(description="MLX's peak after the first steps.")
    predicted_gb: float = Field(description="The prediction for the batches those steps ran.")
    new_predicted_gb: float = Field(description="The new plan's whole-run peak, scaled by the error measured.")
    reason: str

    def apply(self, config: QLoRAConfig) -> QLoRAConfig:
        return config.model_copy(update=self.settings)


def replan_applies(config: QLoRAConfig) -> bool:
    """A plan the search chose, one process (ranks would have to switch together), a budget to fit."""
    return config.fit_to_budget and config.num_processes == 1 and config.memory_budget_gb is not None


def first_steps_change(
    config: QLoRAConfig,
    model_config: dict[str, Any],
    measured_gb: float,
    seen_tokens: int,
    run_dataset: tuple[int | None, list[int]],
    at_step: int,
) -> PlanChange | None:
    """The plan to switch to, or None when the prediction held (within TOLERANCE, and the budget with the error
    carried), or when the fastest plan that fits with the corrected predictions is the one running, or none fits (the
    watchdog then guards the budget).
    `seen_tokens`: the widest batch's inputs so far; `run_dataset`: the longest example and a sample of lengths."""
    budget = config.memory_budget_gb
    if budget is None:
        return None
    seen_predict, _ = run_predictor(config, model_config, seen_tokens)
    predicted = seen_predict(config)[1].total_gb
    error = measured_gb / predicted
    longest, lengths = run_dataset
    run_predict, shape = run_predictor(config, model_config, longest, lengths)
    # within a tenth the plan stands, unless the error carried to the run's longest batch takes it over the budget
    if abs(error - 1) <= TOLERANCE and run_predict(config)[1].total_gb * error <= budget:
        return None

    def corrected(cfg: QLoRAConfig) -> Any:
        plan, parts = run_predict(cfg)
        return plan, parts.model_copy(update={"total_gb": round(parts.total_gb * error, 3)})

    start = config.model_copy(update=PLAN_FIELDS)
    option, considered = search(start, corrected, budget, shape)
    if option is None:
        log.warning("measured %.2f GB where %.2f was predicted; no plan fits %.2f GB", measured_gb, predicted, budget)
        return None
    target = start.model_copy(update=option)
    settings = {k: getattr(target, k) for k in PLAN_FIELDS if getattr(target, k) != getattr(config, k)}
    if not settings:
        return None
    chosen = next(o for o in considered if o.settings == option)
    said = explain(chosen.model_copy(update={"settings": settings}), considered, budget)
    return PlanChange(
        from_step=at_step,
        settings=settings,
        measured_gb=round(measured_gb, 4),
        predicted_gb=round(predicted, 4),
        new_predicted_gb=round(chosen.predicted_gb, 4),
        reason=f"measured {_gb(measured_gb)} GB after {at_step} steps where {_gb(predicted)} was predicted "
        f"({error:.2f}x), so every prediction was scaled by that; now {said}",
    )


def _gb(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def read_change(run_dir: Path) -> PlanChange | None:
    try:
        return PlanChange.model_validate_json((run_dir / RECORD).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:  # unreadable: the run goes on with the plan it was started with
        log.warning("cannot read %s: %s", run_dir / RECORD, exc)
        return None


def write_change(run_dir: Path, change: PlanChange) -> None:
    """Written whole (a temporary file, then renamed) before the change's first step runs."""
    staging = run_dir / f".{RECORD}.tmp"
    staging.write_text(json.dumps(change.model_dump(mode="json"), indent=2), encoding="utf-8")
    staging.replace(run_dir / RECORD)


def run_dataset(run_dir: Path) -> tuple[int | None, list[int]]:
    """The longest example and the sample of lengths the run's checks found (preflight.json), if it has them."""
    try:
        dataset = json.loads((run_dir / "preflight.json").read_text(encoding="utf-8")).get("dataset") or {}
    except (OSError, ValueError):
        return None, []
    return dataset.get("longest_tokens"), list(dataset.get("length_sample") or [])
