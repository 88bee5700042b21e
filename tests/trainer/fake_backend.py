"""A scripted training backend for runner fault tests, loaded by the real worker subprocess by dotted path.

FAKE_MODE picks the behaviour: succeed, fail, crash (SIGKILL itself), segfault, hang, hang_ignoring_term, noisy,
slow (succeed, FAKE_STEP_S seconds per iteration), diverge, stepwise (as the MLX backend stops: at safe points
between steps of FAKE_STEP_S seconds, then a save of FAKE_SAVE_S seconds), paced (FAKE_STEP_S seconds per iteration,
reports as a real run makes them: a train loss every steps_per_report, a validation loss every steps_per_eval),
peak_in_save (stepwise, then MLX memory held through the final save, where stops are dropped), peak_in_steps (stepwise,
MLX memory held from the first step, after the OS-level handlers of SIGTERM and SIGUSR1 were taken from Python, as a
GPU library's can be: NCCL's took SIGUSR1).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from trainer.errors import Diverged
from trainer.lifecycle.backend import (
    Cancelled,
    Emit,
    adapter_dir_for,
    stop_if_requested,
    stops_at_safe_points,
    stops_ignored,
)
from trainer.lifecycle.events import PhaseChanged, Progress, TrainReport, ValReport
from trainer.lifecycle.jobs import Phase
from trainer.planning.config import QLoRAConfig

SPEC = "tests.trainer.fake_backend:FakeBackend"


class FakeBackend:
    name = "fake"

    def device(self) -> str:
        return "none"

    def train(self, config: QLoRAConfig, run_dir: Path, emit: Emit) -> Path:
        mode = os.environ.get("FAKE_MODE", "succeed")
        emit(PhaseChanged(phase=Phase.TRAINING))
        if mode in ("stepwise", "peak_in_save", "peak_in_steps"):
            if mode == "peak_in_steps":
                _take_signals_from_python()
            return _stepwise(
                config, run_dir, emit, peak_in_save=mode == "peak_in_save", peak_in_steps=mode == "peak_in_steps"
            )
        if mode == "noisy":
            print("this line is MLX-LM-style noise on stdout")  # noqa: T201  (must land in worker.log only)
            sys.stdout.flush()
        if mode == "fail":
            raise RuntimeError("the fake backend failed on purpose")
        if mode == "diverge":
            raise Diverged("the train loss became nan at iteration 1: training diverged; lower learning_rate")
        if mode == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        if mode == "hang_ignoring_term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if mode.startswith("hang"):
            emit(Progress(iteration=1, iters=config.iters))
            while True:
                time.sleep(0.05)
        step_s = float(os.environ.get("FAKE_STEP_S", "0.05")) if mode in ("slow", "paced") else 0.0
        for it in range(1, config.iters + 1):
            time.sleep(step_s)
            emit(Progress(iteration=it, iters=config.iters))
            if mode == "paced":  # as a real run reports: a train loss every steps_per_report, a val loss per eval
                _paced_reports(config, it, emit)
                continue
            emit(
                TrainReport(
                    iteration=it,
                    train_loss=1.0 / it,
                    learning_rate=config.learning_rate,
                    iterations_per_second=100.0,
                    tokens_per_second=1000.0,
                    trained_tokens=10 * it,
                    peak_memory=0.01,
                )
            )
        emit(ValReport(iteration=config.iters, val_loss=0.5, val_time=0.01))
        adapters = adapter_dir_for(config, run_dir)
        adapters.mkdir(parents=True, exist_ok=True)
        (adapters / "adapters.safetensors").write_bytes(b"fake")
        (adapters / "adapter_config.json").write_text("{}")  # as MLX-LM writes beside its weights
        return adapters


def _paced_reports(config: QLoRAConfig, it: int, emit: Emit) -> None:
    if it % config.steps_per_report == 0 or it == config.iters:
        emit(
            TrainReport(
                iteration=it, train_loss=2.0 / (1 + it / 20), learning_rate=config.learning_rate,
                iterations_per_second=1.4, tokens_per_second=700.0, trained_tokens=500 * it, peak_memory=0.5,
            )
        )  # fmt: skip
    if it % config.steps_per_eval == 0 and it < config.iters:  # the last one comes after the loop
        emit(ValReport(iteration=it, val_loss=2.2 / (1 + it / 20), val_time=0.2))


def _take_signals_from_python() -> None:
    """Set SIGTERM and SIGUSR1 to be ignored at the OS level, behind Python's back (Python still lists its handlers)."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        libc.signal(int(signum), 1)  # SIG_IGN


def _stepwise(
    config: QLoRAConfig, run_dir: Path, emit: Emit, peak_in_save: bool = False, peak_in_steps: bool = False
) -> Path:
    """Steps a stop waits for (a step is one long call, as an MLX step is), and a save that takes its time."""
    step_s = float(os.environ.get("FAKE_STEP_S", "0.05"))
    adapters = adapter_dir_for(config, run_dir)
    adapters.mkdir(parents=True, exist_ok=True)
    done = 0
    held = None
    try:
        with stops_at_safe_points():
            for it in range(1, config.iters + 1):
                stop_if_requested()
                emit(Progress(iteration=it, iters=config.iters))
                if peak_in_steps and held is None:  # 40 MB in MLX from the first step on
                    import mlx.core as mx

                    held = mx.zeros((10_000_000,), dtype=mx.float32)
                    mx.eval(held)
                time.sleep(step_s)
                done = it
    except Cancelled:
        _save(adapters, done)
        raise
    with stops_ignored():
        if peak_in_save:  # 40 MB in MLX for a few of the sampler's intervals
            import mlx.core as mx

            held = mx.zeros((10_000_000,), dtype=mx.float32)
            mx.eval(held)
            time.sleep(0.6)
        _save(adapters, done)
    return adapters


def _save(adapters: Path, step: int) -> None:
    staging = adapters / "adapters.safetensors.tmp"
    staging.write_bytes(f"step {step}".encode())
    time.sleep(float(os.environ.get("FAKE_SAVE_S", "0")))
    os.replace(staging, adapters / "adapters.safetensors")
    (adapters / "adapter_config.json").write_text("{}")
