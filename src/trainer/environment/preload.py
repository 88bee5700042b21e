"""Native libraries preloaded under MLX on Linux CPUs: an optimised BLAS and a caching memory allocator.

- OpenBLAS: the `mlx[cpu]` wheel links the reference (netlib) BLAS, many times slower; putting Debian's OpenBLAS
  (`libopenblas0-pthread`) in front with LD_PRELOAD makes MLX's matmuls use it.
- tcmalloc: MLX's CPU backend keeps no buffer cache: every array is a fresh `malloc`, and glibc maps (and on free
  unmaps) every block over 32 MB and trims its heap, so each step page-faults its large arrays in again (the
  logits, the MLP activations). Google's tcmalloc (`libtcmalloc-minimal4`) keeps freed memory for reuse
  (docs/benchmarks.md). MLX's own memory accounting (peak, active), which budgets and the watchdog use, is
  unchanged; the process's RSS stays near its high-water mark.

Our install scripts install both; the runner preloads them into every worker and the MCP server (and the demo)
re-execute themselves with them. Where one is missing we say so, once, with the fix.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .blas_core import better_core, cpu_flags, probe_corename

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NativeLibrary:
    name: str
    env: str  # a path to the library to preload instead, or "off"
    candidates: tuple[str, ...]
    package: str  # the Debian/Ubuntu package
    without: str  # what a user loses without it

    def install_hint(self) -> str:
        return f"sudo apt-get install {self.package} (Debian/Ubuntu), or set {self.env} to the library's path"


OPENBLAS = NativeLibrary(
    name="OpenBLAS",
    env="MCP_LOCAL_BLAS",
    candidates=(
        "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
        "/usr/lib/{arch}-linux-gnu/openblas-openmp/libblas.so.3",
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib/libopenblas.so.0",
    ),
    package="libopenblas0-pthread",
    without="MLX will use its reference BLAS, about 20x slower on the CPU",
)
TCMALLOC = NativeLibrary(
    name="tcmalloc",
    env="MCP_LOCAL_MALLOC",
    candidates=(
        "/usr/lib/{arch}-linux-gnu/libtcmalloc_minimal.so.4",
        "/usr/lib64/libtcmalloc_minimal.so.4",
        "/usr/lib/libtcmalloc_minimal.so.4",
    ),
    package="libtcmalloc-minimal4",
    without="MLX's CPU arrays are page-faulted in afresh every step, about 10-35% slower training",
)
LIBRARIES = (OPENBLAS, TCMALLOC)
_warned: set[str] = set()


Env = Mapping[str, str]


def _applies(lib: NativeLibrary, env: Env) -> bool:
    return sys.platform == "linux" and env.get(lib.env, "") != "off"


def find(lib: NativeLibrary, env: Env = os.environ) -> Path | None:
    """The library to preload on this machine (as `env` sets it up), or None (not Linux, off, or not installed)."""
    if not _applies(lib, env):
        return None
    explicit = env.get(lib.env)
    if explicit:
        path = Path(explicit)
        return path if path.is_file() else None
    arch = platform.machine()
    for pattern in lib.candidates:
        path = Path(pattern.format(arch=arch))
        if path.is_file():
            return path
    return None


#: A machine-wide OPENBLAS_CORETYPE makes OpenBLAS run that core's kernels even on a CPU it would give faster ones
#: (docs/benchmarks.md). We never override the user's (it may be there for reproducible float results); we say what
#: it costs, once. Unset, and OpenBLAS picking kernels older than the CPU, we choose (choose_openblas_core).
OPENBLAS_CORE_ENV = "OPENBLAS_CORETYPE"


def openblas_core_held_back(env: Env = os.environ, cpuinfo: Path | None = None) -> str | None:
    """The better core for this CPU when OPENBLAS_CORETYPE names an older one (with OpenBLAS preloaded), else None."""
    core = env.get(OPENBLAS_CORE_ENV, "").strip()
    if not core or find(OPENBLAS, env) is None:
        return None
    return better_core(core, cpu_flags(cpuinfo))


def warn_if_core_held_back(env: Env = os.environ) -> None:
    better = openblas_core_held_back(env)
    if better and OPENBLAS_CORE_ENV not in _warned:
        _warned.add(OPENBLAS_CORE_ENV)
        log.warning(
            "%s=%s makes OpenBLAS run that core's kernels, but this CPU runs its %s kernels: unset it to let OpenBLAS "
            "pick faster ones (docs/benchmarks.md)",
            OPENBLAS_CORE_ENV,
            env.get(OPENBLAS_CORE_ENV),
            better,
        )


def preload_env(base: dict[str, str]) -> dict[str, str]:
    """`base` with the libraries this machine has added to LD_PRELOAD (and a warning for each one missing, or for an
    OPENBLAS_CORETYPE that holds OpenBLAS back)."""
    current = [p for p in base.get("LD_PRELOAD", "").split(":") if p]
    added = []
    for lib in LIBRARIES:
        path = find(lib, base)
        if path is None:
            warn_if_missing(lib, base)
        elif str(path) not in current:
            added.append(str(path))
    warn_if_core_held_back(base)
    base = choose_openblas_core(base)
    return {**base, "LD_PRELOAD": ":".join([*added, *current])} if added else base


def choose_openblas_core(env: dict[str, str]) -> dict[str, str]:
    """Where OpenBLAS would run kernels older than this CPU's (a CPU it does not know), ask for the right ones, and
    say so once; a core type the user set is theirs (warn_if_core_held_back speaks about it)."""
    library = find(OPENBLAS, env)
    if library is None or OPENBLAS_CORE_ENV in env:
        return env
    chosen = probe_corename(str(library))
    better = better_core(chosen, cpu_flags()) if chosen else None
    if better is None:
        return env
    if "core-choice" not in _warned:
        _warned.add("core-choice")
        log.warning(
            "OpenBLAS (%s) picks its %s kernels on this CPU, older than its vector units; using %s instead (set %s "
            "to choose yourself)",
            library,
            chosen,
            better,
            OPENBLAS_CORE_ENV,
        )
    return {**env, OPENBLAS_CORE_ENV: better}


def warn_if_missing(lib: NativeLibrary, env: Env = os.environ) -> None:
    if _applies(lib, env) and find(lib, env) is None and lib.name not in _warned:
        _warned.add(lib.name)
        log.warning("%s not found: %s; %s", lib.name, lib.without, lib.install_hint())


def reexec_with_preloads() -> None:
    """Replace this process with itself, the libraries preloaded (call first thing in a CLI's main, before any I/O)."""
    if sys.platform != "linux":
        return
    env = preload_env(dict(os.environ))
    changed = any(env.get(name) != os.environ.get(name) for name in ("LD_PRELOAD", OPENBLAS_CORE_ENV))
    if changed:  # the second time round nothing changes: no exec loop
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
