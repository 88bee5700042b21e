"""Timing a step and reading MLX's peak for it, the same way in every step benchmark."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx


def measure_steps(step: Callable[[], tuple[Any, Any]], steps: int) -> tuple[list[int], list[float], Any]:
    """Each step from an empty buffer cache and a reset peak, evaluated and waited for: (peaks in bytes, seconds, the
    last step's value). The first step compiles; callers take the best of the rest."""
    peaks: list[int] = []
    times: list[float] = []
    value = None
    for _ in range(steps):
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        tic = time.perf_counter()
        value, grads = step()
        mx.eval(value, grads)
        mx.synchronize()
        times.append(time.perf_counter() - tic)
        peaks.append(mx.get_peak_memory())
        del grads
    return peaks, times, value
