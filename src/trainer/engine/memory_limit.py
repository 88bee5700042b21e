"""MLX's memory limit, held just under the run's budget on a GPU.

MLX's GPU backends return a buffer to the pool only when the GPU has finished the kernels that used it, while the host
may have queued many more: a step's peak holds buffers already dead. Once the buffers in use pass MLX's memory limit,
its `eval` waits for queued work before queuing more (by default at 95% of a CUDA card). Under a limit half a GB below
the budget, dead buffers come back before the budget is spent: what lets the fused loss fit (measured on CUDA,
docs/benchmarks.md). The waits cost time only in a step that reaches the limit.
"""

from __future__ import annotations

import logging
import os

import mlx.core as mx

from ..planning.config import QLoRAConfig
from ..planning.memory_estimate import GB, mlx_limit_gb

log = logging.getLogger(__name__)
#: an experiment's limit in GB for any run ("0": MLX's default), over the budget's
LIMIT_ENV = "MCP_LOCAL_MLX_MEMORY_LIMIT_GB"


def memory_limit_gb(config: QLoRAConfig, gpu: bool) -> float | None:
    """The limit for this run: its budget on a GPU; None leaves MLX's default."""
    given = os.environ.get(LIMIT_ENV)
    if given is not None:
        return float(given) or None
    return mlx_limit_gb(config.memory_budget_gb) if gpu and config.memory_budget_gb else None


def hold_to_budget(config: QLoRAConfig) -> None:
    """Lower MLX's memory limit for this process to what `memory_limit_gb` says (never above MLX's own)."""
    limit = memory_limit_gb(config, mx.default_device() == mx.gpu)
    if limit is not None and limit * GB < mx.get_memory_limit():
        mx.set_memory_limit(int(limit * GB))
        log.info("MLX's memory limit set to %.2f GB", limit)
