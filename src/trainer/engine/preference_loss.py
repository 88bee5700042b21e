"""The preference losses, over a batch of chosen rows then rejected rows (preference_data.pair_batch).

dpo (Rafailov et al. 2023): -log sigmoid(beta * ((chosen - its reference) - (rejected - its reference))), the
log-probabilities summed over each reply's tokens, the reference the base model's (scored once, stored). orpo (Hong
et al. 2024): the chosen replies' per-token negative log-likelihood plus beta times -log sigmoid of the log odds ratio
of the per-token mean probabilities; it needs no reference. Both also give what their reports show: the margin whose
sign says which reply the model prefers, and the mean log-probabilities of each side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import mlx.core as mx

from .losses import completion_mask, token_logps

CrossEntropy = Callable[[mx.array, mx.array], mx.array]


def sequence_logps(model: Any, tokens: mx.array, lengths: mx.array, ce: CrossEntropy) -> tuple[mx.array, mx.array]:
    """Per row: the log-probability of its reply (tokens from its prompt's end to its length), and their count."""
    mask = completion_mask(tokens, lengths)
    return (token_logps(model, tokens, ce) * mask).sum(axis=1), mask.sum(axis=1)


def _log_sigmoid(x: mx.array) -> mx.array:
    return -mx.logaddexp(mx.zeros_like(x), -x)


def pair_terms(
    mode: str, beta: float, logps: mx.array, counts: mx.array, reference: mx.array
) -> tuple[mx.array, mx.array]:
    """(loss per pair, margin per pair: positive when the chosen reply is preferred)."""
    n = logps.shape[0] // 2
    if mode == "dpo":
        margin = beta * ((logps[:n] - reference[:n]) - (logps[n:] - reference[n:]))
        return -_log_sigmoid(margin), margin
    means = logps / mx.maximum(counts, 1).astype(mx.float32)
    log_odds = (means[:n] - means[n:]) - (_log1mexp(means[:n]) - _log1mexp(means[n:]))
    nll = -means[:n]
    return nll - beta * _log_sigmoid(log_odds), log_odds


def _log1mexp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x < 0, kept finite where a reply is almost certain."""
    return mx.log(-mx.expm1(mx.minimum(x, -1e-6)))


def make_preference_loss(mode: str, beta: float, ce: CrossEntropy) -> Callable[..., tuple[mx.array, mx.array]]:
    """The step's loss: the mean over the batch's pairs, and the reply tokens it covered (the run's tokens/s)."""

    def preference_loss(model: Any, tokens: mx.array, lengths: mx.array, reference: mx.array) -> Any:
        logps, counts = sequence_logps(model, tokens, lengths, ce)
        losses, _ = pair_terms(mode, beta, logps, counts, reference)
        return losses.mean(), counts.sum()

    return preference_loss


def evaluate_pairs(
    model: Any, batches: Iterable[Any], mode: str, beta: float, ce: CrossEntropy, progress: Callable[[], None]
) -> dict[str, float] | None:
    """The validation pairs' mean loss, accuracy (the share whose margin is positive), margin and mean chosen and
    rejected log-probabilities; None without validation pairs."""
    totals = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "chosen": 0.0, "rejected": 0.0}
    pairs = 0
    for tokens, lengths, reference in batches:
        logps, counts = sequence_logps(model, tokens, lengths, ce)
        losses, margins = pair_terms(mode, beta, logps, counts, reference)
        n = losses.shape[0]
        parts = [losses.sum(), (margins > 0).sum(), margins.sum(), logps[:n].sum(), logps[n:].sum()]
        mx.eval(parts)
        for key, part in zip(totals, parts, strict=True):
            totals[key] += float(part.item())  # type: ignore[arg-type]  # a scalar
        pairs += n
        progress()
    if not pairs:
        return None
    mean = {key: value / pairs for key, value in totals.items()}
    return {
        "val_loss": mean["loss"],
        "val_accuracy": mean["accuracy"],
        "val_margin": mean["margin"],
        "val_chosen_logp": mean["chosen"],
        "val_rejected_logp": mean["rejected"],
    }
