"""The CPU decode kernels (`native/cpu_decode.cpp`): built once per machine against the installed MLX, then loaded.

MLX's CPU quantized matrix-vector product unpacks one weight at a time, so decode on a CPU was bound by it (or, with
float32 weight copies, by reading 4 bytes per weight), and its RMS norm, RoPE and attention are composed of a dozen
small operations each, whose scheduling cost more than their arithmetic. Our kernels read 4-bit weights directly and
make each of the others one operation. They are C++ MLX primitives, so they must be compiled against the MLX that is
installed: we build them with CMake and the C++ compiler the first time they are needed (7-10 s), keyed by everything
that makes a build differ, in the user's cache folder. Where that cannot work (no compiler, another OS) decode falls
back to MLX's operations, with one warning naming why. Where the kernels measured slower than MLX's own operations
when they were built (decode_choice.py), they are not used either.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import Any

from ..entrypoints import DECODE_KERNEL_BUILD, python_module
from ..environment.process_env import mlx_child_environment
from ..errors import KernelBuildError
from .decode_choice import measure, recorded, stale

log = logging.getLogger(__name__)

KERNEL_ENV = "MCP_LOCAL_DECODE_KERNEL"  # "off" to keep MLX's own operations
#: inputs with at most this many rows (decode) use the kernels; more rows (training, prefill) go to GEMMs
DECODE_ROWS = 4
CACHE_ENV = "MCP_LOCAL_CACHE"  # where built kernels live; default ~/.cache/mcp-local
SOURCE_DIR = Path(__file__).parent / "native"
SOURCES = ("cpu_decode.cpp", "qgemv_kernels.h", "CMakeLists.txt")
MODULE = "_cpu_decode"


def few_rows(x: Any) -> bool:
    """Whether an input (rows x last axis) is decode-sized."""
    return bool(x.size // x.shape[-1] <= DECODE_ROWS)


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mcp-local"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_key() -> str:
    """Everything that makes one build differ from another: sources, MLX, Python, machine and its CPU features (the
    kernel is compiled for the CPU it runs on)."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    for part in (version("mlx"), sys.version, platform.machine(), _cpu_flags(), _nanobind_version()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _nanobind_version() -> str:
    try:
        return version("nanobind")
    except PackageNotFoundError:
        return "missing"


def _cmake() -> str:
    beside_python = Path(sys.executable).parent / "cmake"  # the `cmake` wheel in our environment
    found = str(beside_python) if beside_python.exists() else shutil.which("cmake")
    if not found:
        raise KernelBuildError("CMake was not found; install it (`uv sync` installs the cmake package)")
    return found


def _compiler_check() -> None:
    if os.environ.get("CXX"):
        return
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise KernelBuildError("no C++ compiler was found; install one (Debian/Ubuntu: apt install g++)")


def build(dest: Path, march: str = "native") -> Path:
    """Configure and compile into a scratch folder, then move the module into `dest` (atomically). `march`: the CPU
    to compile for (this one by default; tests build the AVX2 and portable paths too)."""
    if sys.platform != "linux":
        raise KernelBuildError(f"the decode kernels are built for Linux only, not {sys.platform}")
    _compiler_check()
    cmake = _cmake()
    try:
        import mlx
        import nanobind
    except ImportError as exc:
        raise KernelBuildError(f"{exc.name} is missing; `uv sync` installs it") from exc
    dest.mkdir(parents=True, exist_ok=True)
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    with tempfile.TemporaryDirectory(dir=dest.parent) as scratch:
        configure = [
            cmake,
            "-S",
            str(SOURCE_DIR),
            "-B",
            scratch,
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dnanobind_DIR={nanobind.cmake_dir()}",
            f"-DMLX_DIR={Path(mlx.__path__[0]) / 'share' / 'cmake' / 'MLX'}",
            f"-DDECODE_KERNEL_MARCH={march}",
        ]
        for command in (configure, [cmake, "--build", scratch, "-j", str(os.cpu_count() or 2)]):
            done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                tail = (done.stdout + done.stderr)[-1500:]
                raise KernelBuildError(f"building the decode kernel failed ({' '.join(command[:2])}):\n{tail}")
        built = Path(scratch) / f"{MODULE}{suffix}"
        target = dest / built.name
        os.replace(built, target)
    return target


def import_kernel(path: Path) -> ModuleType:
    # OpenMP threads that spin between a token's products take the core MLX-LM builds the next token's graph on;
    # libgomp reads this once, when the module loads it
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    spec = importlib.util.spec_from_file_location(MODULE, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _target() -> Path:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return cache_root() / "decode-kernel" / build_key() / f"{MODULE}{suffix}"


def kernel_path() -> Path:
    """Build the kernel unless this machine has it already; returns its path. Raises KernelBuildError."""
    target = _target()
    dest = target.parent
    if target.exists():
        return target
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / ".lock", "w") as lock:  # one build at a time: the server and a worker may both want it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            log.info("building the CPU decode kernel into %s (once per machine and MLX version)", dest)
            build(dest)
    return target


def wanted() -> bool:
    return os.environ.get(KERNEL_ENV, "on").lower() not in ("0", "off", "false", "no")


_building = threading.Event()  # set while build_in_background works


def build_in_background() -> threading.Thread | None:
    """Build (and measure) the kernel with the set-up's build command in a subprocess, watched by a thread, so that
    no caller waits for it and the caller's process never imports MLX for it; until it is ready, `load` answers None
    (decode uses MLX's own operations). None: nothing to do (built and measured already, turned off, or not Linux)."""
    if sys.platform != "linux" or not wanted():
        return None
    try:
        target = _target()
        choice = recorded(target.parent) if target.exists() else None
        if choice is not None and not stale(choice):
            return None
    except OSError:
        return None

    def work() -> None:
        try:
            command = python_module(DECODE_KERNEL_BUILD)
            env = mlx_child_environment()
            done = subprocess.run(
                command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False, env=env
            )
            said = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            log.log(logging.INFO if done.returncode == 0 else logging.WARNING, "decode kernel build: %s", said)
        finally:
            _building.clear()

    _building.set()
    thread = threading.Thread(target=work, name="decode-kernel-build", daemon=True)
    thread.start()
    return thread


_said_building = threading.Event()


def load() -> ModuleType | None:
    """The kernel module, or None (with one warning saying why) where it is turned off, cannot be built, or is
    being built in the background right now (then the next load may have it)."""
    if _building.is_set():
        if not _said_building.is_set():  # once: every layer of every load asks
            _said_building.set()
            log.info("the CPU decode kernel is being built in the background: loads decode with MLX's operations")
        return None
    return _load_once()


@cache
def _load_once() -> ModuleType | None:
    if not wanted():
        log.info("CPU decode kernel off (%s)", KERNEL_ENV)
        return None
    try:
        path = kernel_path()
        choice = recorded(path.parent)
        if choice is not None and not choice.use_kernel:
            log.warning(
                "CPU decode kernels measured slower than MLX's own operations on this machine when they were built "
                "(%.1f against %.1f tokens/s): decode uses MLX's",
                choice.kernel_tok_s,
                choice.mlx_tok_s,
            )
            return None
        return import_kernel(path)
    except (KernelBuildError, ImportError, OSError) as exc:
        log.warning("CPU decode kernels unavailable, decode uses MLX's own operations, several times slower: %s", exc)
        return None


def main() -> None:
    """`python -m trainer.engine.decode_kernel`: build (or find) the kernel now, so the first generation won't wait."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if sys.platform != "linux":
        log.info("no CPU decode kernel needed on %s", sys.platform)
        return
    import mlx.core as mx

    if mx.default_device().type != mx.DeviceType.cpu:
        log.info("no CPU decode kernel needed: MLX runs on %s here", mx.default_device())
        return
    try:
        path = kernel_path()
    except KernelBuildError as exc:
        log.warning("decode kernel not built: %s", exc)
        return
    log.info("decode kernel: %s", path)
    choice = recorded(path.parent)
    # built now, measured under other libraries or on a busy machine (the set-up asks: measure again): decode both ways
    if choice is None or stale(choice, busy_now=False, recheck_after_s=0):
        choice = measure(path.parent)
    verdict = "used" if choice.use_kernel else "not used: MLX's own operations are faster here"
    if choice.provisional:
        verdict += f" (provisional: measured at load {choice.load_per_core:.1f} per core; measured again later)"
    log.info(
        "decode (SmolLM2 shape, random weights): kernels %.1f tokens/s, MLX's own %.1f: %s",
        choice.kernel_tok_s,
        choice.mlx_tok_s,
        verdict,
    )


if __name__ == "__main__":
    main()
