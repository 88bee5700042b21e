"""The fastest plan that fits: every way to run the same step in less memory, its peak and speed predicted, the
fastest that fits the budget chosen.

The family keeps the step's mathematics (the same loss and gradients, tests/trainer/test_plan_family.py): gradient
accumulation over passes of a token budget, recomputing k of the LoRA blocks in the backward pass, the loss chunked
over the sequence (fused with the head on a GPU), and the layerwise step. Speeds are relative to the unconstrained
plan, from a model of where a step's time goes, calibrated per device kind (docs/benchmarks.md), on the run's own
example lengths: a pass of t padded tokens costs t + t0 (t0: the fixed cost that makes small passes slow); a
recomputed block costs one block's forward, of about L + 2l in a step of L blocks with l trained; the layerwise step
runs at a measured share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from .config import QLoRAConfig
from .device import input_alignment
from .memory_estimate import MemoryParts, MemoryPlan

#: tokens in one pass at which the device runs at half its full rate: CUDA from 1x2048 and 4x1024 on the 7B shape
#: (13.9k and 17.2-17.8k tokens/s, H100/H200); the CPU's matmuls are already saturated by small passes (an estimate).
#: Metal, which cannot be measured here, is a "gpu" and takes CUDA's figures; the watchdog stops a run over budget
HALF_RATE_TOKENS = {"gpu": 1365.0, "cpu": 64.0}
#: the layerwise step's speed against the fused one: 0.72 on CUDA (7B, 1x2048, H100); on the CPU 0.78-0.79 (SmolLM2
#: and Qwen2.5-0.5B shapes, earlier sessions) and 0.72 (SmolLM2 at 2x256, this 2-core Zen 4)
LAYERWISE_SPEED = {"gpu": 0.72, "cpu": 0.75}
#: the chunked loss: on the CPU its extra head pass for the backward (an estimate: one head matmul of the step's); on
#: a GPU it is fused, with no extra pass, and a plan chosen for a budget runs under it as MLX's limit, which waits for
#: queued work (H100, packed 4 x 2,048, 9 recomputed blocks: 0.871x measured without the limit, 0.848x with it)
CHUNKED_LOSS_SPEED = {"gpu": 0.975, "cpu": 0.97}

Predict = Callable[[QLoRAConfig], tuple[MemoryPlan, MemoryParts]]


class PlanOption(BaseModel):
    """One plan considered: its settings, predicted peak and speed relative to the unconstrained plan."""

    settings: dict[str, Any]
    predicted_gb: float
    relative_speed: float = Field(description="Predicted tokens/s over the unconstrained plan's.")
    fits: bool


@dataclass(frozen=True)
class Shape:
    """What a plan's speed depends on besides its settings: the model's blocks, the device, the data's lengths."""

    layers: int
    lora_layers: int
    device: str
    lengths: list[int] = field(default_factory=list)  # a sample of the training examples' tokens, sorted


def _kind(device: str) -> str:
    """The device kind the constants are calibrated for: the CPU, or a GPU (CUDA; Metal takes its figures)."""
    return "cpu" if device == "cpu" else "gpu"


def _pass_cost(examples: int, width: int, half: float) -> float:
    """A pass's time in tokens' worth: its padded tokens, plus the fixed cost that makes small passes slow."""
    return examples * width + half


def _width(tokens: int, limit: int, align: int) -> int:
    """The padded width of an example of `tokens`: aligned up for the kernels, cut at `limit`."""
    return min(limit, -(-tokens // align) * align)


def _neighbour_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Batches of `size` neighbours in token length from sorted lengths (as batches.by_token_length forms them)."""
    return [lengths[i : i + size] for i in range(0, len(lengths) - size + 1, size)] or [lengths]


def _step_costs(batch: list[int], plan: MemoryPlan, align: int, half: float) -> tuple[float, float]:
    """(unconstrained, this plan's) time for one batch of example lengths: one pass padded to the longest, or the
    plan's passes (batches.token_passes: sorted, grouped within pass_tokens, each cut to its own longest)."""
    widths = sorted(_width(n, plan.seq_len, align) for n in batch)
    whole = _pass_cost(len(widths), widths[-1], half)
    if plan.pass_tokens is None:
        return whole, whole
    cost, group = 0.0, 0
    for index, width in enumerate(widths):
        if group and (group + 1) * width > plan.pass_tokens:
            cost += _pass_cost(group, widths[index - 1], half)
            group = 0
        group += 1
    return whole, cost + _pass_cost(group, widths[-1], half)


def relative_speed(plan: MemoryPlan, shape: Shape) -> float:
    """Predicted tokens/s of `plan` over the same batches run unconstrained (one pass each, nothing recomputed), on
    the data's lengths (batches of neighbours in token length, as batches.by_token_length forms them) or, without
    them (and for packed rows), on batches of examples as long as the longest."""
    kind = _kind(shape.device)
    if plan.layerwise:
        return LAYERWISE_SPEED[kind]
    lengths = shape.lengths or [plan.seq_len] * plan.batch_size
    batches = _neighbour_batches(lengths, plan.batch_size)
    align = input_alignment()
    costs = [_step_costs(b, plan, align, HALF_RATE_TOKENS[kind]) for b in batches]
    rate = sum(c[0] for c in costs) / sum(c[1] for c in costs)
    recomputed = min(plan.recomputed_blocks, shape.lora_layers)
    rate /= 1 + recomputed / (shape.layers + 2 * shape.lora_layers)
    return rate * (CHUNKED_LOSS_SPEED[kind] if plan.chunked_loss else 1.0)


#: how full best-fit decreasing fills packed rows (engine/packing.py): 97-99.9% on the benchmarks' records
PACKED_FILL = 0.97


def packed_gain(lengths: list[int], batch: int, seq: int, device: str) -> float:
    """Predicted real tokens/s of packed rows over batches of neighbours in length, both unconstrained, on these
    example lengths: padding and pass costs only (the compilations of each new width that packing saves, measured at
    a further few percent on an H100, are not counted)."""
    half = HALF_RATE_TOKENS[_kind(device)]
    align = input_alignment()
    width = _width(seq, seq + align, align)
    batches = _neighbour_batches(sorted(min(n, seq) for n in lengths), batch)
    padded = sum(_pass_cost(len(b), _width(b[-1], width, align), half) for b in batches)
    sorted_cost = padded / sum(sum(b) for b in batches)
    packed_cost = _pass_cost(batch, width, half) / (batch * width * PACKED_FILL)
    return sorted_cost / packed_cost


def _family(config: QLoRAConfig, lora_layers: int) -> Iterator[dict[str, Any]]:
    """Settings of the same step, from the least to the most memory-saving within each kind. Passes hold whole
    examples of up to max_seq_length tokens."""
    losses = [False, True] if not config.chunked_loss else [True]
    batch, seq = config.per_process_batch, config.max_seq_length
    budgets = [None] + [examples * seq for examples in range(batch - 1, 0, -1)] if config.pass_tokens is None else []
    if config.own_loss:  # its loss takes each example whole, in one pass: only recomputed blocks apply
        losses, budgets = [config.chunked_loss], [None]
    for pass_tokens in budgets or [config.pass_tokens]:
        for chunked in losses:
            for blocks in range(0, lora_layers + 1):
                option: dict[str, Any] = {}
                if pass_tokens != config.pass_tokens:
                    option["pass_tokens"] = pass_tokens
                if chunked != config.chunked_loss:
                    option["chunked_loss"] = True
                if blocks:
                    option.update(grad_checkpoint=True, checkpoint_blocks=blocks)
                yield option
    if not config.layerwise and not config.own_loss and not config.packing:  # the layerwise step takes no packed rows
        layerwise = {"layerwise": True, "chunked_loss": True, "pass_tokens": None, "grad_checkpoint": False}
        yield {k: v for k, v in layerwise.items() if getattr(config, k) != v}


def search(
    config: QLoRAConfig, predict: Predict, budget: float, shape: Shape
) -> tuple[dict[str, Any] | None, list[PlanOption]]:
    """The fastest predicted plan of the family that fits (None if none does), and the best of each kind considered
    (for each pass size and loss, the fewest recomputed blocks that fit)."""
    considered: list[PlanOption] = []
    seen: set[tuple[Any, ...]] = set()
    lora_layers = shape.lora_layers
    for option in _family(config, lora_layers):
        kind = (option.get("pass_tokens"), option.get("chunked_loss"), option.get("layerwise"))
        if kind in seen:
            continue  # more recomputed blocks of a kind that already fits: only slower
        candidate = config.model_copy(update=option)
        plan, parts = predict(candidate)
        fits = parts.total_gb <= budget
        if fits or option.get("checkpoint_blocks") == lora_layers or option.get("layerwise"):
            seen.add(kind)
            speed = relative_speed(plan, shape)
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
