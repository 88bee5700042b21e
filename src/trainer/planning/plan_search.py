"""The fastest plan that fits: every way to run the same step in less memory, its peak and speed predicted, the
fastest that fits the budget chosen.

The family keeps the step's mathematics (the same loss and gradients, tests/trainer/test_plan_family.py): gradient
accumulation over micro-batches, recomputing k of the LoRA blocks in the backward pass, the loss fused (GPU) or
chunked (CPU) over the vocabulary, and the layerwise step. Speeds are relative to the unconstrained plan, from a model
of where a step's time goes, calibrated per device kind (docs/benchmarks.md): a recomputed block costs one block's
forward, a step of L blocks with l trained costs about L + 2l of them; a pass of t tokens runs at t / (t + t0) of the
device's full rate; the layerwise step runs at a measured share of the fused one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from pydantic import BaseModel, Field

from .config import QLoRAConfig
from .memory_estimate import MemoryParts, MemoryPlan

#: tokens in one pass at which the device runs at half its full rate: CUDA from 1x2048 and 4x1024 on the 7B shape
#: (13.9k and 17.2-17.8k tokens/s, H100/H200); the CPU's matmuls are already saturated by small passes (an estimate;
#: Metal uncalibrated: the CPU's, with the first steps' measured peak the safety net)
HALF_RATE_TOKENS = {"gpu": 1365.0, "cpu": 64.0}
#: the layerwise step's speed against the fused one: 0.72 on CUDA (7B, 1x2048, H100), 0.78 on the CPU (SmolLM2 and
#: Qwen2.5-0.5B shapes)
LAYERWISE_SPEED = {"gpu": 0.72, "cpu": 0.78}
#: the fused or chunked loss: its extra head pass for the backward (an estimate: one head matmul of the step's)
LOSS_RECOMPUTE_SPEED = 0.97

Predict = Callable[[QLoRAConfig], tuple[MemoryPlan, MemoryParts]]


class PlanOption(BaseModel):
    """One plan considered: its settings, predicted peak and speed relative to the unconstrained plan."""

    settings: dict[str, Any]
    predicted_gb: float
    relative_speed: float = Field(description="Predicted tokens/s over the unconstrained plan's.")
    fits: bool


def relative_speed(plan: MemoryPlan, layers: int, lora_layers: int, device: str) -> float:
    """Predicted tokens/s of `plan` over the same batch run unconstrained (one pass, nothing recomputed)."""
    kind = "cpu" if device == "cpu" else "gpu"
    if plan.layerwise:
        return LAYERWISE_SPEED[kind]
    half = HALF_RATE_TOKENS[kind]
    whole, per_pass = plan.batch_size * plan.seq_len, plan.pass_batch * plan.seq_len
    rate = (per_pass / (per_pass + half)) / (whole / (whole + half))
    recomputed = min(plan.recomputed_blocks, lora_layers)
    rate /= 1 + recomputed / (layers + 2 * lora_layers)
    return rate * (LOSS_RECOMPUTE_SPEED if plan.chunked_loss else 1.0)


def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _family(config: QLoRAConfig, lora_layers: int) -> Iterator[dict[str, Any]]:
    """Settings of the same step, from the least to the most memory-saving within each kind."""
    losses = [False, True] if not config.chunked_loss else [True]
    for micro in _divisors_descending(config.per_process_batch):
        for chunked in losses:
            for blocks in range(0, lora_layers + 1):
                option: dict[str, Any] = {}
                if micro != config.per_process_batch:
                    option["micro_batch_size"] = micro
                if chunked != config.chunked_loss:
                    option["chunked_loss"] = True
                if blocks:
                    option.update(grad_checkpoint=True, checkpoint_blocks=blocks)
                yield option
    if not config.layerwise:
        layerwise = {"layerwise": True, "chunked_loss": True, "micro_batch_size": None, "grad_checkpoint": False}
        yield {k: v for k, v in layerwise.items() if getattr(config, k) != v}


def search(
    config: QLoRAConfig, predict: Predict, budget: float, layers: int, lora_layers: int, device: str
) -> tuple[dict[str, Any] | None, list[PlanOption]]:
    """The fastest predicted plan of the family that fits (None if none does), and the best of each kind considered
    (for each micro-batch size and loss, the fewest recomputed blocks that fit)."""
    considered: list[PlanOption] = []
    seen: set[tuple[Any, ...]] = set()
    for option in _family(config, lora_layers):
        kind = (option.get("micro_batch_size"), option.get("chunked_loss"), option.get("layerwise"))
        if kind in seen:
            continue  # more recomputed blocks of a kind that already fits: only slower
        candidate = config.model_copy(update=option)
        plan, parts = predict(candidate)
        fits = parts.total_gb <= budget
        if fits or option.get("checkpoint_blocks") == lora_layers or option.get("layerwise"):
            seen.add(kind)
            speed = relative_speed(plan, layers, lora_layers, device)
            considered.append(PlanOption(settings=option, predicted_gb=parts.total_gb, relative_speed=speed, fits=fits))
    fitting = [o for o in considered if o.fits]
    best = max(fitting, key=lambda o: o.relative_speed, default=None)
    return (best.settings if best else None), considered


def explain(chosen: PlanOption | None, considered: list[PlanOption], budget: float) -> str:
    """One line: what was chosen, its predicted peak and speed, and the runner-up."""
    if chosen is None:
        return f"no plan of the same step fits {budget:.2f} GB"
    ranked = sorted((o for o in considered if o.fits), key=lambda o: -o.relative_speed)
    runner = next((o for o in ranked if o.settings != chosen.settings), None)
    said = ", ".join(f"{k}={v}" for k, v in chosen.settings.items()) or "unchanged"
    text = (
        f"{said}: predicted {chosen.predicted_gb:.2f} GB of {budget:.2f}, {chosen.relative_speed:.2f}x the "
        f"unconstrained speed, the fastest of {len(ranked)} plans that fit"
    )
    if runner is not None:
        other = ", ".join(f"{k}={v}" for k, v in runner.settings.items())
        text += f" (next: {other} at {runner.relative_speed:.2f}x)"
    return text
