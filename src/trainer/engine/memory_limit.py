"""MLX's memory limit, held at the run's budget on CUDA.

MLX's CUDA backend returns a buffer to its pool only when the GPU has finished the kernels that used it, while the host
may have queued many more: a step's peak holds buffers already dead. Once the buffers in use pass MLX's memory limit,
its `eval` waits for queued work before it queues more (95% of the card by default). A run whose plan was chosen to fit
its budget gets that limit, so dead buffers are returned before the budget is spent (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os

import mlx.core as mx

from ..planning.config import QLoRAConfig

log = logging.getLogger(__name__)
#: an experiment's limit in GB for any run on CUDA ("0": none), over the budget's
LIMIT_ENV = "MCP_LOCAL_MLX_MEMORY_LIMIT_GB"
GB = 1e9


def memory_limit_gb(config: QLoRAConfig, cuda: bool) -> float | None:
    """The limit for this run: its budget on CUDA when the run must stay under it; None leaves MLX's default."""
    given = os.environ.get(LIMIT_ENV)
    if given is not None:
        return float(given) or None
    if not cuda or config.memory_budget_gb is None or config.allow_over_budget:
        return None
    return config.memory_budget_gb


def hold_to_budget(config: QLoRAConfig) -> None:
    """Set MLX's memory limit for this process as `memory_limit_gb` says."""
    limit = memory_limit_gb(config, mx.default_device() == mx.gpu and mx.cuda.is_available())
    if limit is not None:
        mx.set_memory_limit(int(limit * GB))
        log.info("MLX's memory limit set to %.2f GB", limit)
