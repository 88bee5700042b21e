"""The training backend seam: the worker calls `backend.train`; tests swap in a fake by dotted path."""

from __future__ import annotations

import importlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from ..entrypoints import TRAINING_BACKEND
from ..errors import ConfigError
from ..planning.config import QLoRAConfig
from .events import Checkpoint, Failed, Packed, PhaseChanged, Progress, Replanned, Resumed, TrainReport, ValReport

#: what a backend may emit; the worker stamps seq/ts and writes it to the event channel
BackendEvent = PhaseChanged | Progress | TrainReport | ValReport | Checkpoint | Resumed | Replanned | Packed | Failed
Emit = Callable[[BackendEvent], None]

DEFAULT_BACKEND = TRAINING_BACKEND
BACKEND_ENV = "TRAINER_BACKEND"


class Cancelled(BaseException):
    """Raised in the worker's main thread by SIGTERM; backends may save the adapter, then must re-raise."""


class OverBudget(Cancelled):
    """Raised in the worker's main thread when the watchdog saw the run's memory pass its budget."""


class _Stops:
    """Stop requests (SIGTERM, the watchdog) waiting for a safe point: an exception raised while MLX builds or runs a
    step can leave the model's arrays unevaluable, and then the adapter cannot be saved. Only the first request
    counts: a second SIGTERM (two cancels at once) must not interrupt the save the first one started."""

    deferred = False
    ignored = False
    requested = False
    pending: type[Cancelled] | None = None


def request_stop(kind: type[Cancelled]) -> None:
    """From a signal handler: stop now, or at the next safe point while a backend has asked for that."""
    if _Stops.requested or _Stops.ignored:
        return
    _Stops.requested = True
    if not _Stops.deferred:
        raise kind()
    _Stops.pending = kind


def stop_if_requested() -> None:
    """A safe point (between steps): raise the pending stop, if any."""
    kind, _Stops.pending = _Stops.pending, None
    if kind is not None:
        raise kind()


def reclaim_stop_signals() -> None:
    """Point SIGTERM and SIGUSR1 at Python's handlers again at the OS level: a library loaded since they were set (a
    GPU backend's: NCCL once took SIGUSR1) may have taken them, and a cancel would then kill instead of stopping."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        handler = signal.getsignal(signum)
        if callable(handler):
            signal.signal(signum, handler)


@contextmanager
def stops_at_safe_points() -> Iterator[None]:
    """Within the block, stop requests wait for `stop_if_requested`; one still pending at its end is raised then. A
    block is one run's training: an earlier run's stop (in this process: tests) no longer counts."""
    _Stops.requested, _Stops.pending = False, None
    _Stops.deferred = True
    reclaim_stop_signals()
    try:
        yield
    finally:
        _Stops.deferred = False
    stop_if_requested()


@contextmanager
def stops_ignored() -> Iterator[None]:
    """Within the block (the final save, once every step is done), stop requests are dropped."""
    _Stops.ignored = True
    try:
        yield
    finally:
        _Stops.ignored = False


class TrainingBackend(Protocol):
    name: str

    def device(self) -> str: ...

    def train(self, config: QLoRAConfig, run_dir: Path, emit: Emit) -> Path:
        """Train; return the adapter folder. Raise ConfigError for bad input, anything else for a failure."""
        ...


def load_backend(spec: str | None = None) -> TrainingBackend:
    spec = spec or os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"{BACKEND_ENV}={spec!r} must look like 'package.module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load training backend {spec!r}: {exc}") from exc
    backend: TrainingBackend = cls()
    return backend


def adapter_dir_for(config: QLoRAConfig, run_dir: Path) -> Path:
    return Path(config.adapter_dir) if config.adapter_dir else run_dir / "adapters"
