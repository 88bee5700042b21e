"""The run's plan over its steps: the step function and recomputed blocks of the plan in force, the first-steps
check (planning/replan.py) and the switch to a changed plan at the step its record names, without leaving the loop
(its report window and batch order go on)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..lifecycle.backend import Emit
from ..lifecycle.events import Replanned
from ..planning.config import QLoRAConfig
from ..planning.replan import (
    FIRST_STEPS,
    PlanChange,
    first_steps_change,
    read_change,
    replan_applies,
    run_dataset,
    write_change,
)
from .loop import Loss, Step, accumulating_step, fused_step, in_passes, layerwise_step
from .run_state import LoopState

log = logging.getLogger(__name__)


def step_for(config: QLoRAConfig, model: Any, optimizer: Any) -> tuple[Step, Loss]:
    """The plan's training step (MLX-LM's compiled step with our loss, accumulated over passes, or the layerwise
    step) and its validation loss. Built after a checkpoint's optimizer state is loaded: the compiled step captures
    that state."""
    from ..planning.device import fast_path_on
    from .losses import cross_entropy_for, training_loss

    fast = fast_path_on(config.fast_path)
    if config.preference:
        from .preference_loss import make_preference_loss

        preference = make_preference_loss(config.mode, config.beta, cross_entropy_for(fast))
        return fused_step(model, optimizer, preference), preference
    if config.mode == "grpo":
        from .grpo_loss import make_grpo_loss

        grpo = make_grpo_loss(config.beta, cross_entropy_for(fast), config.temperature)
        return fused_step(model, optimizer, grpo), grpo
    if not config.layerwise:
        loss = training_loss(fast, config.chunked_loss)  # validation batches are never packed
        train = training_loss(fast, config.chunked_loss, packed=True) if config.packing else loss
        if config.pass_tokens is not None:
            return accumulating_step(model, optimizer, train, config.pass_tokens), in_passes(loss, config.pass_tokens)
        return fused_step(model, optimizer, train), loss
    from .layerwise import make_layerwise_eval_loss, supports_layerwise

    if not supports_layerwise(model):
        raise ConfigError(f"layerwise=true is not supported for {type(model).__module__}; set it to false")
    ce = cross_entropy_for(fast)
    return layerwise_step(model, optimizer, ce), make_layerwise_eval_loss(ce)


class RunPlans:
    """A context: within it the plan in force has its blocks recomputed; `step` and `val_loss` are its functions.
    A change recorded at or before the start step is in force from the start; one recorded for a later step is
    switched to there; with none recorded, a run of fit_to_budget is measured after its first steps."""

    def __init__(
        self, config: QLoRAConfig, run_dir: Path, model: Any, optimizer: Any, emit: Emit, start_step: int
    ) -> None:
        self.run_dir, self.model, self.optimizer, self.emit = run_dir, model, optimizer, emit
        self.due = read_change(run_dir)
        self.watching = self.due is None and replan_applies(config) and start_step < FIRST_STEPS < config.iters
        if self.due is not None and self.due.from_step <= start_step:
            config, self.due = self.due.apply(config), None
        self.config = config
        self.widest = 0
        self._blocks = contextlib.ExitStack()
        self.step, self.val_loss = step_for(config, model, optimizer)

    def __enter__(self) -> RunPlans:
        self._recompute_blocks()
        return self

    def __exit__(self, *exc: object) -> None:
        self._blocks.close()

    def _recompute_blocks(self) -> None:
        from .patches import checkpointed_blocks

        self._blocks.enter_context(checkpointed_blocks(self.model, self.config.recomputed_blocks))

    def after_step(self, done: LoopState, inputs: int) -> None:
        """Note the batch's width; after the first steps, decide (and record) whether the plan changes."""
        self.widest = max(self.widest, inputs)
        if not self.watching or done.step < FIRST_STEPS:
            return
        self.watching = False
        change = self._measure(done.step)
        if change is None:
            return
        write_change(self.run_dir, change)  # before its first step runs: a resumed run switches at the same step
        self.due = change
        log.info("plan changed from step %d: %s", change.from_step + 1, change.reason)
        self.emit(Replanned(iteration=change.from_step, **change.model_dump(exclude={"from_step"})))

    def _measure(self, step: int) -> PlanChange | None:
        import mlx.core as mx

        from ..planning.modelref import read_model_config

        try:
            model_config = read_model_config(Path(self.config.model))
            mx.synchronize()  # the last step's backward pass may still run: its peak counts
            measured = mx.get_peak_memory() / 1e9
            return first_steps_change(self.config, model_config, measured, self.widest, run_dataset(self.run_dir), step)
        except (ConfigError, KeyError) as exc:  # no prediction for this model: the watchdog guards the budget
            log.info("no first-steps check: %s", exc)
            return None

    def before_step(self, step: int) -> tuple[Step, Loss] | None:
        """At the change's first step: the new plan's functions (its blocks recomputed from here), else None."""
        import mlx.core as mx

        if self.due is None or step != self.due.from_step + 1:
            return None
        self.config, self.due = self.due.apply(self.config), None
        self._blocks.close()
        self._recompute_blocks()
        self.step, self.val_loss = step_for(self.config, self.model, self.optimizer)
        mx.synchronize()  # the old plan's last step done, so that the peak from here is the new plan's
        mx.reset_peak_memory()  # from here the watchdog and the reports measure the new plan
        return self.step, self.val_loss
