"""Budgets: predict a run's peak before it starts, refuse or fit it to the budget, with concrete alternatives."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, Field

from ..errors import ConfigError
from .config import QLoRAConfig
from .device import device_kind, fast_path_on, input_alignment
from .memory_estimate import MemoryParts, MemoryPlan, dense_copy_bytes, mlx_limit_gb, predict_peak
from .modelref import num_hidden_layers
from .plan_search import PlanOption, Predict, Shape, explain, packed_gain, search

log = logging.getLogger(__name__)
#: `dense_weights` turns itself on (CPU, fast path) when the float32 copies take at most this much and this share of
#: the budget: enough for the 0.5B shape, whose copies pay for themselves (docs/benchmarks.md)
DENSE_AUTO_MAX_GB = 2.5
DENSE_AUTO_BUDGET_SHARE = 0.2


class MemoryCheck(BaseModel):
    prediction: MemoryParts
    plan: MemoryPlan
    budget_gb: float
    fits: bool
    changes: list[str] = Field(default_factory=list, description="Settings fit_to_budget changed.")
    choice: str | None = Field(None, description="Over budget: the fastest plan that fits, and why.")
    plans: list[PlanOption] = Field(default_factory=list, description="Over budget: the plans considered.")


def compute_bytes(fast_path: bool | None) -> tuple[int, str, bool]:
    """Bytes per activation element, the device kind and whether the fast path is on, for these settings."""
    device = device_kind()
    fast = fast_path_on(fast_path)
    return (4 if device == "cpu" and fast else 2), device, fast


def plan_for(
    config: QLoRAConfig,
    seq_len: int,
    bytes_per_element: int,
    device: str = "cpu",
    fast: bool = False,
    budget: float | None = None,
) -> MemoryPlan:
    """`budget` stands in for a config without one; on a GPU it is also MLX's limit (engine/memory_limit.py)."""
    limit = config.memory_budget_gb or budget
    return MemoryPlan(
        # the budget and the prediction are per process; a preference step runs each pair's two replies at once, a
        # grpo step each prompt's completions (their sampling's KV cache is far smaller than the step's activations)
        batch_size=config.per_process_batch * config.rows_per_example,
        seq_len=seq_len,
        num_layers=config.num_layers,
        rank=config.rank,
        grad_checkpoint=config.grad_checkpoint,
        recomputed_blocks=config.recomputed_blocks,
        pass_tokens=config.pass_tokens,
        chunked_loss=config.chunked_loss,
        quantize_bits=config.quantize_bits,
        compute_bytes=bytes_per_element,
        device=device,
        fast_path=fast,
        dense_weights=bool(config.dense_weights),
        layerwise=config.layerwise,
        packed=config.packing,
        memory_limit_gb=None if device == "cpu" or limit is None else mlx_limit_gb(limit),
    )


def _alternatives(config: QLoRAConfig, device: str = "cpu") -> list[dict[str, Any]]:
    """Where no plan of the same step fits: settings that change it, least intrusive first: no float32 weight copies
    (CPU); MLX's own kernels instead of the fast path, whose dequantized weights stay allocated (GPU); the least
    memory of the same step; smaller batches; shorter sequences."""
    steps: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    if config.dense_weights:
        current = {"dense_weights": False}
        steps.append(current)
    if device != "cpu" and config.fast_path is not False:
        current = {**current, "fast_path": False}
        steps.append(current)
    for option in ("grad_checkpoint",) if config.own_loss else ("grad_checkpoint", "chunked_loss", "layerwise"):
        if not current.get(option) and not getattr(config, option):
            current = {**current, option: True, "checkpoint_blocks": None, "pass_tokens": None}
            steps.append(current)
    batch, processes = config.batch_size, config.num_processes
    while batch > processes:  # halved, still split evenly over the processes
        batch = max(processes, batch // 2 // processes * processes)
        current = {**current, "batch_size": batch}
        steps.append(current)
    seq = config.max_seq_length
    while seq > 256:
        seq = max(256, seq // 2)
        current = {**current, "max_seq_length": seq}
        steps.append(current)
    return steps


def dense_fits(model_config: dict[str, Any], budget_gb: float) -> bool:
    """Whether the float32 weight copies are small enough for `dense_weights` to turn itself on."""
    return dense_copy_bytes(model_config) <= min(DENSE_AUTO_MAX_GB, DENSE_AUTO_BUDGET_SHARE * budget_gb) * 1e9


def run_predictor(
    config: QLoRAConfig,
    model_config: dict[str, Any],
    longest: int | None,
    lengths: list[int] | None = None,
    budget: float | None = None,
) -> tuple[Predict, Shape]:
    """The peak prediction for a config of this run (its examples at most `longest` tokens; None: max_seq_length),
    and the shape the plan search predicts speeds on."""
    _, device, _ = compute_bytes(config.fast_path)
    align = input_alignment()
    layers = num_hidden_layers(model_config)
    if layers is None:
        raise KeyError("num_hidden_layers")  # a config without the dimensions a prediction needs (callers say so)
    lora_layers = layers if config.num_layers == -1 else min(config.num_layers, layers)

    def predict(cfg: QLoRAConfig) -> tuple[MemoryPlan, MemoryParts]:
        if cfg.packing:  # every row is full: max_seq_length inputs, aligned (engine/packing.py)
            seq = -(-cfg.max_seq_length // align) * align
        elif longest and cfg.mode == "grpo":  # the dataset counts its prompts; each gets a completion
            seq = min(cfg.max_seq_length, longest + cfg.completion_tokens)
        else:
            seq = min(cfg.max_seq_length, longest) if longest else cfg.max_seq_length
        if align > 32 and not cfg.packing:  # CUDA: inputs padded to 128s (the CPU's calibration: MLX-LM's padding)
            seq = -(-(seq - 1) // align) * align
        cfg_bytes, _, cfg_fast = compute_bytes(cfg.fast_path)
        plan = plan_for(cfg, seq, cfg_bytes, device, cfg_fast, budget)
        plan = plan.model_copy(update={"recomputed_blocks": min(plan.recomputed_blocks, lora_layers)})  # "all": l
        return plan, predict_peak(model_config, plan)

    # packed rows are all as wide as the prediction's sequence, which a shape without lengths stands for
    return predict, Shape(layers, lora_layers, device, [] if config.packing else lengths or [])


def check_memory(
    config: QLoRAConfig,
    model_config: dict[str, Any],
    default_budget: float,
    longest_tokens: int | None,
    lengths: list[int] | None = None,
) -> tuple[QLoRAConfig, MemoryCheck]:
    """Predict the run's peak; apply fit_to_budget; raise ConfigError when it does not fit and is not allowed.

    The sequence length is `longest_tokens` (the dataset's longest example), capped at max_seq_length; None uses
    max_seq_length as is. `lengths` (a sample of the training examples' tokens) lets the plan search predict speeds
    on the run's own data.
    """
    budget = config.memory_budget_gb or default_budget
    _, device, fast = compute_bytes(config.fast_path)
    if config.dense_weights is None:  # decide now, so that the prediction and the worker agree
        config = config.model_copy(
            update={"dense_weights": device == "cpu" and fast and dense_fits(model_config, budget)}
        )
    predict, shape = run_predictor(config, model_config, longest_tokens, lengths, budget)
    plan, parts = predict(config)
    changes: list[str] = []
    choice: str | None = None
    considered: list[PlanOption] = []
    if parts.total_gb > budget:
        option, considered = search(config, predict, budget, shape)
        chosen = next((o for o in considered if o.settings == option), None) if option is not None else None
        choice = explain(chosen, considered, budget)
        hint = _packing_hint(config, predict, budget, shape, chosen)
        choice += f"; {hint}" if hint else ""
        if config.fit_to_budget:
            option = option if option is not None else _first_fitting(config, predict, budget, device)
            if option is not None:
                changes = [f"{k}={v}" for k, v in option.items()]
                config = config.model_copy(update=option)
                plan, parts = predict(config)
                log.info("fit_to_budget: %s (predicted %.2f GB)", ", ".join(changes), parts.total_gb)
    fits = parts.total_gb <= budget
    check = MemoryCheck(
        prediction=parts, plan=plan, budget_gb=budget, fits=fits, changes=changes, choice=choice, plans=considered
    )
    if not fits and not config.allow_over_budget:
        raise ConfigError(refusal_message(config, parts, budget, predict, device, considered))
    return config.model_copy(update={"memory_budget_gb": budget}), check


def _packing_hint(
    config: QLoRAConfig, predict: Any, budget: float, shape: Shape, chosen: PlanOption | None
) -> str | None:
    """On a GPU, records of mixed lengths: the fastest packed plan that fits, when it beats the chosen one by a tenth
    (packing changes what a step holds, so the search never turns it on itself; on the CPU it is slower)."""
    if config.packing or shape.device == "cpu" or len(set(shape.lengths)) < 2:
        return None
    try:
        packed = QLoRAConfig.parse({**config.model_dump(exclude_none=True), "packing": True})
    except ConfigError:  # packing is refused for this run (layerwise, several processes, a preference mode)
        return None
    option, considered = search(packed, predict, budget, replace(shape, lengths=[]))
    best = next((o for o in considered if o.settings == option), None)
    if best is None:
        return None
    gain = packed_gain(shape.lengths, config.per_process_batch, config.max_seq_length, shape.device)
    speed = best.relative_speed * gain
    if chosen is not None and speed < 1.1 * chosen.relative_speed:
        return None
    said = ", ".join(f"{k}={v}" for k, v in {"packing": True, **best.settings}.items())
    return f"on this GPU {said} would fit at about {speed:.2f}x (rows of whole records: steps hold more tokens)"


def _first_fitting(config: QLoRAConfig, predict: Any, budget: float, device: str) -> dict[str, Any] | None:
    for option in _alternatives(config, device):
        if predict(config.model_copy(update=option))[1].total_gb <= budget:
            return option
    return None


def refusal_message(
    config: QLoRAConfig,
    parts: MemoryParts,
    budget: float,
    predict: Any,
    device: str,
    considered: list[PlanOption] | None = None,
) -> str:
    breakdown = (
        f"weights {parts.weights_gb:.2f}, LoRA+optimizer {parts.lora_gb:.2f}, activations "
        f"{parts.activations_gb:.2f}, logits {parts.logits_gb:.2f}, slack {parts.slack_gb:.2f}"
    )
    head = f"run predicted to peak at {parts.total_gb:.2f} GB ({breakdown}), over its memory budget of {budget:.2f} GB"
    fitting = sorted((o for o in considered or [] if o.fits), key=lambda o: -o.relative_speed)
    options = [(o.settings, o.predicted_gb) for o in fitting[:1]]
    for option in _alternatives(config, device) if not options else []:
        _, cand = predict(config.model_copy(update=option))
        if cand.total_gb <= budget:
            options = [(option, cand.total_gb)]
            break
    for option, predicted in options:
        settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in option.items())
        return (
            f"{head}; these settings would fit: {settings} (predicted {predicted:.2f} GB); pass "
            "fit_to_budget=true to choose them, or allow_over_budget=true to start anyway"
        )
    return (
        f"{head}; no smaller setting of this run fits: use a smaller model, raise memory_budget_gb, or pass "
        "allow_over_budget=true to start anyway"
    )
