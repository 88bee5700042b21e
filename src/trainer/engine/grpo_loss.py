"""GRPO's loss (Shao et al. 2024, DeepSeekMath) over a batch of completions (grpo_data.group_batch): each token's
log-probability weighted by its completion's group-normalized advantage, plus beta times the per-token KL to the
reference (the base, adapter off) by the estimator exp(r - p) - (r - p) - 1, averaged over each completion's tokens
and then over completions. One update per batch of samples (on-policy), so the clipped ratio of the paper is 1 and
only its gradient remains."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from .losses import CrossEntropy, completion_mask, token_logps

#: keeps a group whose rewards are all equal at advantage 0 (its std is 0)
STD_FLOOR = 1e-4


def group_advantages(rewards: Sequence[float], group: int) -> np.ndarray:
    """(reward - its group's mean) / its group's std, per completion (groups of `group` in a row)."""
    values = np.asarray(rewards, np.float32).reshape(-1, group)
    centred = values - values.mean(axis=1, keepdims=True)
    advantages: np.ndarray = (centred / (values.std(axis=1, keepdims=True) + STD_FLOOR)).reshape(-1)
    return advantages


def make_grpo_loss(beta: float, ce: CrossEntropy, temperature: float = 1.0) -> Callable[..., tuple[mx.array, mx.array]]:
    """The step's loss and the completion tokens it covered (the run's tokens/s)."""

    def grpo_loss(model: Any, tokens: mx.array, lengths: mx.array, advantages: mx.array, reference: mx.array) -> Any:
        mask = completion_mask(tokens, lengths)
        logps = token_logps(model, tokens, ce, temperature)
        ratio = mx.exp(logps - mx.stop_gradient(logps))  # 1, with the gradient of log p
        gap = reference - logps
        per_token = -ratio * advantages[:, None] + beta * (mx.exp(gap) - gap - 1)
        counts = mask.sum(axis=1)
        per_completion = (per_token * mask).sum(axis=1) / mx.maximum(counts, 1).astype(mx.float32)
        return per_completion.mean(), counts.sum()

    return grpo_loss
