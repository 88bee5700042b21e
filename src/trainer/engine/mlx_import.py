"""MLX with no backend: a clear error naming what to install, instead of `libmlx.so: cannot open shared object`.

On Linux the `mlx` package carries no backend; `mlx[cpu]` or `mlx[cuda13]` adds one (`uv sync` here installs the CPU
one by default; a plain `pip install` or `uvx` of this package needs its `cpu` or `cuda` extra).
"""

from __future__ import annotations

from ..errors import ModelError

INSTALL_BACKEND = (
    "MLX is installed without a backend ({detail}): install one with `pip install 'mcp-local[cpu]'` (Linux CPU) or "
    "`pip install 'mcp-local[cuda]'` (NVIDIA; uvx: `uvx --from 'mcp-local[cpu]' mcp-local`), or `uv sync` in a "
    "source checkout"
)


def require_mlx() -> None:
    """Import MLX's core, or raise ModelError saying which backend to install."""
    try:
        import mlx.core  # noqa: F401
    except ImportError as exc:
        raise ModelError(INSTALL_BACKEND.format(detail=exc)) from None
