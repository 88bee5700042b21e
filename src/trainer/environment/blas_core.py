"""Which kernels OpenBLAS actually runs on this CPU, and the core type to ask for when it fell back to older ones.

An OpenBLAS release that does not know a newer CPU runs its generic kernels there (Debian's 0.3.21 on a 2024 Intel
Xeon: Prescott, about a quarter of the SkylakeX kernels' speed; docs/benchmarks.md). We ask the library itself
(`openblas_get_corename`, in a subprocess, so this process loads nothing) and compare with the CPU's own features.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
_PROBE = (
    "import ctypes, sys\n"
    "lib = ctypes.CDLL(sys.argv[1])\n"
    "lib.openblas_get_corename.restype = ctypes.c_char_p\n"
    "print(lib.openblas_get_corename().decode())\n"
)
AVX512_FLAGS = frozenset({"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512cd"})
#: OpenBLAS cores with AVX-512 kernels, and those with at least AVX2 ones
_AVX512_CORES = frozenset({"skylakex", "cooperlake", "sapphirerapids"})
_AVX2_CORES = _AVX512_CORES | frozenset({"haswell", "zen", "skylake", "alderlake", "excavator", "steamroller"})


def cpu_flags(cpuinfo: Path | None = None) -> frozenset[str]:
    try:
        text = (cpuinfo or CPUINFO).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@cache
def probe_corename(library: str, coretype: str | None = None) -> str | None:
    """The core name OpenBLAS at `library` reports here (with OPENBLAS_CORETYPE=`coretype`), or None if unreadable."""
    env = {"PATH": os.environ.get("PATH", "")}
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, library], capture_output=True, text=True, env=env, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    name = done.stdout.strip()
    return name if done.returncode == 0 and name else None


def better_core(corename: str, flags: frozenset[str]) -> str | None:
    """The core type to ask for when OpenBLAS's choice lacks the CPU's widest vectors; None when its choice is fine."""
    name = corename.strip().lower()
    if AVX512_FLAGS <= flags and name not in _AVX512_CORES:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags and name not in _AVX2_CORES:
        return "Haswell"
    return None
