"""Memory sampling: this process's RSS, MLX's allocator (active, peak, cache) and the system, in GB."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psutil

from .events import MemorySample

log = logging.getLogger(__name__)
GB = 1e9


def _mlx_memory() -> tuple[float, float, float]:
    try:
        import mlx.core as mx
    except ImportError:  # a fake backend or an MLX-less install still gets RSS and system numbers
        return 0.0, 0.0, 0.0
    return mx.get_active_memory() / GB, mx.get_peak_memory() / GB, mx.get_cache_memory() / GB


def sample_memory(process: psutil.Process | None = None, *, with_mlx: bool = True) -> MemorySample:
    proc = process or psutil.Process()
    system = psutil.virtual_memory()
    active, peak, cache = _mlx_memory() if with_mlx else (0.0, 0.0, 0.0)
    return MemorySample(
        rss_gb=proc.memory_info().rss / GB,
        active_gb=active,
        peak_gb=peak,
        cache_gb=cache,
        system_total_gb=system.total / GB,
        system_available_gb=system.available / GB,
    )


class MemorySampler:
    """Samples memory every `interval` seconds on a daemon thread, independent of the training loop."""

    def __init__(self, interval: float, emit: Callable[[MemorySample], None], *, with_mlx: bool = True) -> None:
        self.interval = interval
        self._emit = emit
        self._with_mlx = with_mlx
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._process = psutil.Process()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._emit(sample_memory(self._process, with_mlx=self._with_mlx))
            except OSError:  # the event channel closed: the parent is gone, nothing left to report to
                log.warning("memory sampler stopped: event channel closed")
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
