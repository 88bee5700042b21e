"""Workers and the server get our MLX settings (kernel cache under the home, operations per command buffer), unless
the user set them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from trainer.environment.mlx_env import DRIVER_CACHE_ENV, OPS_PER_BUFFER_ENV, PTX_CACHE_ENV, mlx_env
from trainer.environment.process_env import worker_environment


def test_workers_get_our_mlx_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (PTX_CACHE_ENV, DRIVER_CACHE_ENV, OPS_PER_BUFFER_ENV):
        monkeypatch.delenv(name, raising=False)
    env = worker_environment({}, tmp_path)
    assert env[PTX_CACHE_ENV] == str(tmp_path / "cache" / "mlx-ptx")
    assert env[DRIVER_CACHE_ENV] == str(tmp_path / "cache" / "cuda")
    assert env.get(OPS_PER_BUFFER_ENV) == (None if sys.platform == "darwin" else "8")


def test_settings_the_user_made_are_kept(tmp_path: Path) -> None:
    env = mlx_env({PTX_CACHE_ENV: "/data/ptx", OPS_PER_BUFFER_ENV: "50", "PATH": os.defpath}, tmp_path)
    assert env[PTX_CACHE_ENV] == "/data/ptx" and env[OPS_PER_BUFFER_ENV] == "50"
    assert env[DRIVER_CACHE_ENV] == str(tmp_path / "cache" / "cuda") and env["PATH"] == os.defpath


def test_a_run_on_a_gpu_holds_mlx_to_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLX's eval waits for queued GPU work once its buffers pass the limit: the budget, on a GPU; an experiment's
    setting overrides; on the CPU (which frees at once) MLX's default stands."""
    from trainer.engine.memory_limit import LIMIT_ENV, memory_limit_gb
    from trainer.planning.config import QLoRAConfig

    monkeypatch.delenv(LIMIT_ENV, raising=False)
    must_fit = QLoRAConfig(model="m", data="d", memory_budget_gb=16)
    assert memory_limit_gb(must_fit, gpu=True) == 15.5  # under the budget by what passes it between checks
    assert memory_limit_gb(must_fit, gpu=False) is None
    assert memory_limit_gb(QLoRAConfig(model="m", data="d"), gpu=True) is None
    monkeypatch.setenv(LIMIT_ENV, "20")
    assert memory_limit_gb(must_fit, gpu=False) == 20
    monkeypatch.setenv(LIMIT_ENV, "0")
    assert memory_limit_gb(must_fit, gpu=True) is None


def test_the_limit_is_set_in_mlx_and_never_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlx.core as mx

    from trainer.engine.memory_limit import LIMIT_ENV, hold_to_budget
    from trainer.planning.config import QLoRAConfig

    before = mx.get_memory_limit()
    try:
        monkeypatch.setenv(LIMIT_ENV, "1.5")
        hold_to_budget(QLoRAConfig(model="m", data="d"))
        assert mx.get_memory_limit() == 1_500_000_000
        monkeypatch.setenv(LIMIT_ENV, str(before * 4 / 1e9))  # above MLX's own: left as it is
        hold_to_budget(QLoRAConfig(model="m", data="d"))
        assert mx.get_memory_limit() == 1_500_000_000
    finally:
        mx.set_memory_limit(before)
