"""The environment MLX reads when it starts, as our server and workers set it up (where the user has not).

- Kernel cache: MLX's CUDA build compiles most kernels with NVRTC on first use (a fresh machine's first 7B decode ran
  at 22 tokens/s against 162 with the kernels cached, 180 warm) and caches them in /tmp/mlx/<version>/ptx: lost at
  reboot where /tmp is a tmpfs, and unwritable when another user created it first. The CUDA driver caches its own JIT
  output in ~/.nv. We keep both in our home's cache folder.
- Operations per command buffer: MLX's CUDA backend frees a step's intermediate buffers only as each command buffer
  (CUDA graph) completes. At 8 operations per buffer, the 7B-shaped QLoRA step at 1x2048 on an H200 peaked at
  20.6 GB at 13,988-15,071 tokens/s with our fast path, against 29.1 GB at 12,305-13,922 at MLX's default, and plain
  MLX-LM at 18.0 GB instead of 24.6 (bench/results-gpu-h200-ops-per-buffer.jsonl). Not set on macOS, where Metal's
  default is tuned for Apple's GPUs.
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
