"""Workers and the server keep MLX's compiled CUDA kernels under our home, unless the user chose a place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainer import JobRunner, RunStore
from trainer.kernel_cache import DRIVER_CACHE_ENV, PTX_CACHE_ENV, kernel_cache_env


async def test_workers_get_the_kernel_cache_under_the_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PTX_CACHE_ENV, raising=False)
    monkeypatch.delenv(DRIVER_CACHE_ENV, raising=False)
    async with JobRunner(RunStore(tmp_path)) as runner:
        env = runner._worker_env()
    assert env[PTX_CACHE_ENV] == str(tmp_path / "cache" / "mlx-ptx")
    assert env[DRIVER_CACHE_ENV] == str(tmp_path / "cache" / "cuda")


def test_a_cache_the_user_set_is_kept(tmp_path: Path) -> None:
    env = kernel_cache_env({PTX_CACHE_ENV: "/data/ptx", "PATH": os.defpath}, tmp_path)
    assert env[PTX_CACHE_ENV] == "/data/ptx" and env[DRIVER_CACHE_ENV] == str(tmp_path / "cache" / "cuda")
    assert env["PATH"] == os.defpath
