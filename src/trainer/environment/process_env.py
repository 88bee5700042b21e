"""The environment a worker process starts with: ours, the caller's overrides, and MLX's and the preloads' settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .mlx_env import mlx_env
from .preload import preload_env


def worker_environment(overrides: Mapping[str, str], home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    return preload_env(mlx_env(env, home))
