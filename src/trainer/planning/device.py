"""Which MLX backend a run will get, decided without importing MLX (the server never loads it to plan a run)."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

FAST_ENV = "MCP_LOCAL_FAST_QUANT"
_CUDA_DISTRIBUTIONS = ("mlx-cuda", "mlx-cuda-12", "mlx-cuda-13")


def _mlx_loaded_device() -> str | None:
    """The device of an MLX this process already imported (it is the truth when there is one)."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return None
    return "cpu" if mx.default_device() == mx.cpu else ("metal" if mx.metal.is_available() else "cuda")


def _has_distribution(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def backend_kind() -> str:
    """'metal' on Apple silicon, 'cuda' where MLX's CUDA build is installed, else 'cpu'."""
    loaded = _mlx_loaded_device()
    if loaded is not None:
        return loaded
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "metal"
    if any(_has_distribution(name) for name in _CUDA_DISTRIBUTIONS):
        return "cuda"
    return "cpu"


def device_kind() -> str:
    """'cpu' or 'gpu', as the memory prediction distinguishes them."""
    return "cpu" if backend_kind() == "cpu" else "gpu"


def fast_path_default() -> bool:
    """On where it helps: the CPU and CUDA backends; off on Metal, where MLX's own kernels are fast."""
    env = os.environ.get(FAST_ENV)
    if env is not None:
        return env not in ("0", "false", "off", "no")
    return backend_kind() != "metal"


def fast_path_on(wanted: bool | None) -> bool:
    """The fast path is on when `wanted`, or by backend when None."""
    return fast_path_default() if wanted is None else wanted


def group_backend(backend: str) -> str:
    """The MLX distributed backend a run's processes use: NCCL between CUDA GPUs, else the ring (TCP) backend."""
    if backend != "auto":
        return backend
    return "nccl" if backend_kind() == "cuda" else "ring"


ALIGN_ENV = "MCP_LOCAL_INPUT_ALIGN"


def input_alignment() -> int:
    """A batch's inputs are padded to a multiple of this: 128 on CUDA, where MLX's fused attention backward (cuDNN)
    needs one (otherwise it falls back to materializing every score matrix: slower, and more memory than predicted);
    32 elsewhere, as MLX-LM pads. `MCP_LOCAL_INPUT_ALIGN` overrides it."""
    given = os.environ.get(ALIGN_ENV)
    if given:
        return max(1, int(given))
    return 128 if backend_kind() == "cuda" else 32
