"""A run as a picture: loss (train and validation; grpo: its rewards too) and memory (samples, prediction, budget) over
iterations, as PNG.

Rendered with matplotlib's non-interactive Agg backend (no display); imported only when a plot is asked for, since
matplotlib takes a while to import.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from .events import MemorySample, TrainReport, ValReport

#: headroom above the highest sample or prediction; a budget above twice that is noted instead of drawn
HEADROOM = 1.2


def memory_scale(
    memory: Sequence[MemorySample], predicted_gb: float | None, budget_gb: float | None
) -> tuple[float, bool]:
    """The memory panel's top (GB), scaled to the samples and the prediction, and whether the budget line fits: a
    1.5 GB run under a 16 GB budget would otherwise sit in the panel's bottom tenth."""
    data = max([m.peak_gb for m in memory] + [m.active_gb for m in memory] + [predicted_gb or 0.0, 0.01])
    top = data * HEADROOM
    if budget_gb is not None and budget_gb <= 2 * top:
        return max(top, budget_gb * 1.05), True
    return top, False


def _iteration_of(samples: Sequence[MemorySample], reports: Sequence[TrainReport]) -> list[float]:
    """Memory samples carry times, reports carry iterations: place each sample at the iteration of its time."""
    if not reports:
        return [0.0 for _ in samples]
    points = [(r.ts, float(r.iteration)) for r in reports]
    placed = []
    for sample in samples:
        before = [p for p in points if p[0] <= sample.ts]
        after = [p for p in points if p[0] > sample.ts]
        if not before:
            placed.append(0.0)
        elif not after:
            placed.append(before[-1][1])
        else:
            (t0, i0), (t1, i1) = before[-1], after[0]
            placed.append(i0 + (i1 - i0) * (sample.ts - t0) / (t1 - t0))
    return placed


def _rewards(loss_axes: Any, train: Sequence[TrainReport], validation: Sequence[ValReport]) -> None:
    """grpo: its rewards (the share of tests passed) on the loss panel's right axis, the curve that says it learns."""
    rewarded = [r for r in train if r.reward is not None]
    checked = [v for v in validation if v.val_reward is not None]
    if not rewarded and not checked:
        return
    axes = loss_axes.twinx()
    axes.plot(
        [r.iteration for r in rewarded],
        [r.reward for r in rewarded],
        "^-",
        ms=3,
        color="tab:purple",
        label="reward (sampled)",
    )
    axes.plot([v.iteration for v in checked], [v.val_reward for v in checked], "v--", ms=4, color="tab:brown",
              label="val reward (greedy)")  # fmt: skip
    axes.set_ylabel("share of tests passed")
    axes.set_ylim(0, 1.05)
    axes.legend(loc="upper left", fontsize=8)


def render_run_plot(
    title: str,
    train: Sequence[TrainReport],
    validation: Sequence[ValReport],
    memory: Sequence[MemorySample],
    predicted_gb: float | None,
    budget_gb: float | None,
) -> bytes:
    """The PNG's bytes: loss on top, memory below, sharing the iteration axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5), dpi=100, layout="constrained")
    loss_axes, memory_axes = figure.subplots(2, 1, sharex=True)
    figure.suptitle(title, fontsize=10)
    loss_axes.plot([r.iteration for r in train], [r.train_loss for r in train], "o-", ms=3, label="train loss")
    loss_axes.plot([v.iteration for v in validation], [v.val_loss for v in validation], "s--", ms=4, label="val loss")
    loss_axes.set_ylabel("loss")
    loss_axes.legend(loc="upper right", fontsize=8)
    loss_axes.grid(alpha=0.3)
    _rewards(loss_axes, train, validation)
    ranks = sorted({m.rank for m in memory})
    for rank in ranks:  # a run of several processes: one pair of lines per process (the budget is per process)
        own = [m for m in memory if m.rank == rank]
        label = f" rank {rank}" if len(ranks) > 1 else ""
        places = _iteration_of(own, train)
        memory_axes.plot(places, [m.peak_gb for m in own], "-", label=f"MLX peak{label} (GB)")
        memory_axes.plot(places, [m.active_gb for m in own], "-", alpha=0.6, label=f"MLX active{label}")
    if predicted_gb is not None:
        memory_axes.axhline(predicted_gb, color="tab:green", ls=":", label=f"predicted {predicted_gb:.2f} GB")
    top, budget_shown = memory_scale(memory, predicted_gb, budget_gb)
    if budget_gb is not None and budget_shown:
        memory_axes.axhline(budget_gb, color="tab:red", ls="--", label=f"budget {budget_gb:.2f} GB")
    elif budget_gb is not None:  # far above the data: a note, so the samples keep the panel's height
        memory_axes.annotate(
            f"budget {budget_gb:.2f} GB (above the scale) \u2191", xy=(0.99, 0.97), xycoords="axes fraction",
            ha="right", va="top", fontsize=8, color="tab:red",
        )  # fmt: skip
    memory_axes.set_ylim(0, top)
    memory_axes.set_xlabel("iteration")
    memory_axes.set_ylabel("GB")
    memory_axes.legend(loc="lower right", fontsize=8)
    memory_axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
