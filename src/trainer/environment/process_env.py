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


def mlx_child_environment(home: Path | None = None, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """For an MLX child (evaluation, fuse, export, GGUF import; a worker through worker_environment): this process's
    environment and `overrides`, plus the preloads and, given our home, MLX's cache settings."""
    env = {**os.environ, **(overrides or {})}
    return preload_env(mlx_env(env, home) if home is not None else env)


def worker_environment(overrides: Mapping[str, str], home: Path) -> dict[str, str]:
    """A training worker's: unbuffered, since its stderr is the run's log as it happens."""
    return mlx_child_environment(home, {**overrides, "PYTHONUNBUFFERED": "1"})


def main() -> int:
    env = mlx_child_environment()
    for name in ("LD_PRELOAD", OPENBLAS_CORE_ENV):
        sys.stdout.write(f"{name}={env.get(name, '')}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
