"""95% bootstrap intervals for held-out figures, over the units that vary together (files, or functions).

A figure is a ratio of sums over units (a loss: summed negative log-likelihood over summed tokens; a mean: values
over ones); each resample draws the units with replacement. A change base -> adapter resamples the same units for
both (paired), so what the two share (an easy file) does not widen its interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

RESAMPLES = 2000
LEVEL = 0.95


class Interval(BaseModel):
    model_config = ConfigDict(frozen=True)

    value: float
    low: float = Field(description="The 2.5th percentile of the bootstrap.")
    high: float = Field(description="The 97.5th percentile of the bootstrap.")

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


class Change(BaseModel):
    """One figure, base against adapter, and whether the difference's interval leaves zero out."""

    model_config = ConfigDict(frozen=True)

    metric: str
    base: float
    adapter: float
    difference: Interval = Field(description="adapter - base, with its paired 95% interval.")
    higher_is_better: bool
    verdict: Literal["better", "worse", "no clear change"]

    def __str__(self) -> str:
        return f"{self.metric}: {self.base:.3f} -> {self.adapter:.3f}, change {self.difference} ({self.verdict})"


Transform = Callable[[np.ndarray], np.ndarray]


def _identity(values: np.ndarray) -> np.ndarray:
    return values


def _exp(values: np.ndarray) -> np.ndarray:
    return np.asarray(np.exp(np.minimum(values, 50.0)))


TRANSFORMS: dict[str, Transform] = {"identity": _identity, "exp": _exp}


def _bounds(stats: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(stats, [(1 - LEVEL) / 2 * 100, (1 + LEVEL) / 2 * 100])
    return float(low), float(high)


def _draws(units: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, units, size=(RESAMPLES, units))


def ratio_interval(
    numerators: Sequence[float], denominators: Sequence[float], transform: str = "identity", seed: int = 0
) -> Interval:
    """transform(sum numerators / sum denominators), with its interval over the units."""
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    apply = TRANSFORMS[transform]
    value = float(apply(np.array(num.sum() / max(den.sum(), 1e-12))))
    if len(num) < 2:
        return Interval(value=value, low=value, high=value)
    draws = _draws(len(num), seed)
    low, high = _bounds(apply(num[draws].sum(1) / np.maximum(den[draws].sum(1), 1e-12)))
    return Interval(value=value, low=low, high=high)


def paired_change(
    metric: str,
    base: tuple[Sequence[float], Sequence[float]],
    adapter: tuple[Sequence[float], Sequence[float]],
    *,
    higher_is_better: bool,
    transform: str = "identity",
    seed: int = 0,
) -> Change:
    """adapter - base of a ratio figure (numerators, denominators per unit, the same units in the same order)."""
    bn, bd = (np.asarray(x, dtype=float) for x in base)
    an, ad = (np.asarray(x, dtype=float) for x in adapter)
    apply = TRANSFORMS[transform]

    def figure(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return apply(num.sum(-1) / np.maximum(den.sum(-1), 1e-12))

    base_value, adapter_value = float(figure(bn, bd)), float(figure(an, ad))
    diff = adapter_value - base_value
    low = high = diff
    if len(bn) >= 2:
        draws = _draws(len(bn), seed)
        diffs = figure(an[draws], ad[draws]) - figure(bn[draws], bd[draws])
        low, high = _bounds(diffs)
    if low > 0 or high < 0:
        verdict: Literal["better", "worse", "no clear change"] = "better" if (low > 0) == higher_is_better else "worse"
    else:
        verdict = "no clear change"
    return Change(
        metric=metric, base=base_value, adapter=adapter_value, difference=Interval(value=diff, low=low, high=high),
        higher_is_better=higher_is_better, verdict=verdict,
    )  # fmt: skip
