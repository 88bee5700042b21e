"""The environment an MLX child process starts with: ours, the caller's overrides, and MLX's and the preloads' settings.

Every process that runs MLX gets it, whoever started us: without the preloads MLX's CPU matmuls fall back to the
reference BLAS, and a held-out loss ran at 14 tokens/s instead of 203 (docs/benchmarks.md). `python -m
trainer.environment.process_env` prints what a child gets on this machine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from .mlx_env import mlx_env
from .preload import OPENBLAS_CORE_ENV, preload_env


def worker_environment(overrides: Mapping[str, str], home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    return preload_env(mlx_env(env, home))


def mlx_child_environment(home: Path | None = None) -> dict[str, str]:
    """For a one-off MLX child (evaluation, fuse, export, GGUF import): this process's environment plus the preloads
    and, given our home, MLX's cache settings."""
    env = dict(os.environ)
    return preload_env(mlx_env(env, home) if home is not None else env)


def main() -> int:
    env = mlx_child_environment()
    for name in ("LD_PRELOAD", OPENBLAS_CORE_ENV):
        sys.stdout.write(f"{name}={env.get(name, '')}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
