"""MLX with no backend: a clear error naming what to install, instead of `libmlx.so: cannot open shared object`.

On Linux the `mlx` package carries no backend; `mlx[cpu]` or `mlx[cuda13]` adds one (`uv sync` here installs the CPU
one by default; a plain `pip install` or `uvx` of this package needs its `cpu` or `cuda` extra).
"""

from __future__ import annotations

from ..errors import ModelError
from ..first_import import import_once

#: what this process's generation imports (first_import.py says why one at a time)
_MLX_STACK = ("mlx.core", "mlx.nn", "mlx_lm", "mlx_lm.utils", "mlx_lm.generate", "mlx_lm.sample_utils")

INSTALL_BACKEND = (
    "MLX is installed without a backend ({detail}): install one with `pip install 'mcp-local[cpu]'` (Linux CPU) or "
    "`pip install 'mcp-local[cuda]'` (NVIDIA; uvx: `uvx --from 'mcp-local[cpu]' mcp-local`), or `uv sync` in a "
    "source checkout"
)


def require_mlx() -> None:
    """Import MLX and mlx-lm once, one thread at a time, or raise ModelError saying which backend to install."""
    try:
        import_once("mlx.core")
    except ImportError as exc:
        raise ModelError(INSTALL_BACKEND.format(detail=exc)) from None
    for name in _MLX_STACK[1:]:
        import_once(name)
