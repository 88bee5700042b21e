"""The environment MLX reads when it starts, as our server and workers set it up (where the user has not).

- Kernel cache: MLX's CUDA build compiles most kernels with NVRTC on first use (slow: docs/benchmarks.md) and caches
  them in /tmp/mlx/<version>/ptx: lost at reboot where /tmp is a tmpfs, and unwritable when another user created it
  first. The CUDA driver caches its own JIT
  output in ~/.nv. We keep both in our home's cache folder.
- Operations per command buffer: MLX's CUDA backend frees a step's intermediate buffers only as each command buffer
  (CUDA graph) completes; 8 operations per buffer lowered the 7B-shaped step's peak and raised its speed on an H200
  (docs/benchmarks.md). Not set on macOS, where Metal's default is tuned for Apple's GPUs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PTX_CACHE_ENV = "MLX_PTX_CACHE_DIR"
DRIVER_CACHE_ENV = "CUDA_CACHE_PATH"
OPS_PER_BUFFER_ENV = "MLX_MAX_OPS_PER_BUFFER"
OPS_PER_BUFFER = "8"


def mlx_env(base: dict[str, str], home: Path) -> dict[str, str]:
    """`base` with our MLX settings added where `base` does not set them already."""
    env = dict(base)
    env.setdefault(PTX_CACHE_ENV, str(home / "cache" / "mlx-ptx"))
    env.setdefault(DRIVER_CACHE_ENV, str(home / "cache" / "cuda"))
    if sys.platform != "darwin":
        env.setdefault(OPS_PER_BUFFER_ENV, OPS_PER_BUFFER)
    return env


def use_mlx_env(home: Path) -> None:
    """Apply `mlx_env` to this process (before MLX evaluates anything: it reads these settings once)."""
    os.environ.update(mlx_env(dict(os.environ), home))
