"""An optimised BLAS under MLX on Linux CPUs.

The `mlx[cpu]` wheel links the reference (netlib) BLAS: a 1024x1024 float32 matmul runs at about 5 GFLOP/s on a
2-core x86 machine, against about 120-180 with OpenBLAS. Putting Debian's OpenBLAS (`libopenblas0-pthread`) in front
with LD_PRELOAD makes MLX's matmuls use it. Our install scripts install it; the runner preloads it into every
worker and the MCP server re-executes itself with it. Where it is missing we say so, once, with the fix.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path

log = logging.getLogger(__name__)

BLAS_ENV = "MCP_LOCAL_BLAS"  # a path to a libblas.so.3 to preload, or "off"
_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
INSTALL_HINT = "sudo apt-get install libopenblas0-pthread (Debian/Ubuntu), or set MCP_LOCAL_BLAS to a libblas.so.3"
_warned = False


def _applies() -> bool:
    return sys.platform == "linux" and os.environ.get(BLAS_ENV, "") != "off"


def find_openblas() -> Path | None:
    """The OpenBLAS to preload on this machine, or None (not Linux, disabled, or not installed)."""
    if not _applies():
        return None
    explicit = os.environ.get(BLAS_ENV)
    if explicit:
        path = Path(explicit)
        return path if path.is_file() else None
    arch = platform.machine()
    for pattern in _CANDIDATES:
        path = Path(pattern.format(arch=arch))
        if path.is_file():
            return path
    return None


def preloaded(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    blas = find_openblas()
    return blas is not None and str(blas) in env.get("LD_PRELOAD", "").split(":")


def blas_env(base: dict[str, str]) -> dict[str, str]:
    """`base` with OpenBLAS added to LD_PRELOAD when it is available (and a warning when it is not)."""
    blas = find_openblas()
    if blas is None:
        warn_if_missing()
        return base
    current = [p for p in base.get("LD_PRELOAD", "").split(":") if p]
    if str(blas) in current:
        return base
    return {**base, "LD_PRELOAD": ":".join([str(blas), *current])}


def warn_if_missing() -> None:
    global _warned
    if _applies() and find_openblas() is None and not _warned:
        _warned = True
        log.warning(
            "OpenBLAS not found: MLX will use its reference BLAS, about 20x slower on the CPU; %s", INSTALL_HINT
        )


def reexec_with_blas() -> None:
    """Replace this process with itself, OpenBLAS preloaded (call first thing in a CLI's main, before any I/O)."""
    if not _applies() or preloaded():
        return
    env = blas_env(dict(os.environ))
    if "LD_PRELOAD" in env and env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
