"""Memory sampling: this process's RSS, MLX's allocator (active, peak, cache) and the system, in GB."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable

import psutil
from pydantic import BaseModel, Field

from .events import MemorySample

log = logging.getLogger(__name__)
GB = 1e9


def _mlx_memory() -> tuple[float, float, float]:
    """MLX's allocator, if this process has loaded MLX (it holds nothing otherwise; importing it here would load it
    into the server just to read zeros)."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return 0.0, 0.0, 0.0
    try:
        return mx.get_active_memory() / GB, mx.get_peak_memory() / GB, mx.get_cache_memory() / GB
    except AttributeError:  # another thread is importing it right now
        return 0.0, 0.0, 0.0


def sample_memory(process: psutil.Process | None = None) -> MemorySample:
    proc = process or psutil.Process()
    system = psutil.virtual_memory()
    active, peak, cache = _mlx_memory()
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

    def __init__(self, interval: float, emit: Callable[[MemorySample], None]) -> None:
        self.interval = interval
        self._emit = emit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._process = psutil.Process()

    def _sample(self) -> bool:
        try:
            self._emit(sample_memory(self._process))
        except OSError:  # the event channel closed: the parent is gone, nothing left to report to
            log.warning("memory sampler stopped: event channel closed")
            return False
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if not self._sample():
                return

    def __enter__(self) -> MemorySampler:
        # The first sample is taken here, not on the thread: a run shorter than the thread's first time slice on a
        # loaded machine would otherwise record no sample at all.
        if self._sample():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class ProcessMemory(BaseModel):
    pid: int
    rss_gb: float
    mlx_active_gb: float | None = None
    mlx_peak_gb: float | None = None
    mlx_cache_gb: float | None = None


class WorkerMemory(ProcessMemory):
    run_id: str
    sampled_at: float | None = Field(None, description="When the worker last sampled its MLX memory (epoch s).")
    rank_peaks_gb: list[float] | None = Field(None, description="A run of several processes: each one's MLX peak.")


def process_memory(pid: int | None = None) -> ProcessMemory:
    """This process's memory (or another's RSS only: MLX's numbers are per process)."""
    if pid is None or pid == os.getpid():
        own = sample_memory()
        return ProcessMemory(
            pid=os.getpid(),
            rss_gb=own.rss_gb,
            mlx_active_gb=own.active_gb,
            mlx_peak_gb=own.peak_gb,
            mlx_cache_gb=own.cache_gb,
        )
    return ProcessMemory(pid=pid, rss_gb=psutil.Process(pid).memory_info().rss / GB)


def workers_memory(workers: dict[str, tuple[int, list[MemorySample]]]) -> list[WorkerMemory]:
    """run id -> (pid, its latest sample or none): each worker's RSS now, with the MLX numbers of its last sample."""
    found = []
    for run_id, (pid, last) in workers.items():
        try:
            rss = process_memory(pid).rss_gb
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
        sample = last[-1] if last else None
        found.append(
            WorkerMemory(
                run_id=run_id,
                pid=pid,
                rss_gb=rss,
                mlx_active_gb=sample.active_gb if sample else None,
                mlx_peak_gb=sample.peak_gb if sample else None,
                mlx_cache_gb=sample.cache_gb if sample else None,
                sampled_at=sample.ts if sample else None,
                rank_peaks_gb=None,
            )
        )
    return found
