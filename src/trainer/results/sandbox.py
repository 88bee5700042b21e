"""Running model-written code (HumanEval completions and their tests) where it can do little harm.

Each program runs in a fresh Python (`-I`: no user site, no PYTHON* variables) in its own temporary folder, with an
environment of its own (no inherited tokens or keys), limits on CPU seconds, memory, file size and open files, a
wall-clock timeout that kills its process group, and truncated output. Inside, an audit hook (PEP 578: it cannot be
removed) refuses network use, new processes, ctypes and any write, delete or rename outside the folder. On Linux,
where unprivileged user namespaces work, it also runs in a network namespace with no interfaces. This guards against
the mistakes of generated code, as HumanEval's own authors ask; it is not a boundary for hostile code.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

Outcome = Literal["passed", "failed", "timed_out", "blocked"]
#: what the sandbox reports of a program's output (the rest is cut)
OUTPUT_CHARS = 4000

_BOOT = r"""
import os, sys
ROOT = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
               "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "os.replace"}
DENIED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.spawn", "os.kill",
          "os.killpg", "pty.", "ctypes.", "os.startfile", "os.setuid", "os.chroot", "signal.pthread_kill")

def inside(path):
    try:
        real = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return real == ROOT or real.startswith(ROOT + os.sep)

def guard(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags > 0 and flags & WRITE_FLAGS)
        if writing and not isinstance(path, int) and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside its folder is not allowed")
    elif event in PATH_EVENTS:
        if not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
            raise PermissionError(f"sandbox: {event} outside its folder is not allowed")
    elif event.startswith(DENIED):
        raise PermissionError(f"sandbox: {event} is not allowed")

source = open("program.py", encoding="utf-8").read()
sys.addaudithook(guard)
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
"""


class SandboxResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    outcome: Outcome
    seconds: float
    output: str

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


@cache
def _network_namespace() -> list[str]:
    """`unshare -rn` when this Linux lets unprivileged users make a network namespace (else nothing: the audit hook
    still refuses sockets)."""
    unshare = shutil.which("unshare")
    if sys.platform != "linux" or unshare is None:
        return []
    probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, check=False, timeout=10)
    return [unshare, "-rn", "--"] if probe.returncode == 0 else []


#: run first in the child: its rlimits, then the real command. No `preexec_fn`: with one, the child is made by fork(),
#: whose handlers deadlocked in OpenBLAS's (0.3.21) thread shutdown in an evaluation that had used MLX; without one,
#: Python makes it with vfork(), which runs no fork handlers
_LIMITED = (
    "import os, resource, sys\n"
    "cpu, memory, files = (int(v) for v in sys.argv[1:4])\n"
    "for limit, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (memory << 20, memory << 20)),\n"
    "                     (resource.RLIMIT_FSIZE, (16 << 20, 16 << 20)), (resource.RLIMIT_NOFILE, (files, files)),\n"
    "                     (resource.RLIMIT_CORE, (0, 0))):\n"
    "    resource.setrlimit(limit, value)\n"
    "try:\n"
    "    os.execvp(sys.argv[4], sys.argv[4:])\n"
    "except OSError as exc:\n"
    "    sys.exit(f'cannot run {sys.argv[4]!r}: {exc.strerror}')\n"
)


def _limited(argv: list[str], cpu_s: int, memory_mb: int, files: int = 64) -> list[str]:
    """`argv` run under its limits: the network namespace, then our launcher setting the rlimits, then exec."""
    limits = [str(cpu_s), str(memory_mb), str(files)]
    return [*_network_namespace(), sys.executable, "-I", "-S", "-c", _LIMITED, *limits, *argv]


def run_sandboxed(program: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `program` (Python source) as described above; it passes when it exits with status 0."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sandbox-") as folder:
        Path(folder, "program.py").write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        cmd = _limited([sys.executable, "-I", "-X", "utf8", "-c", _BOOT], max(1, int(timeout_s)), memory_mb)
        child = subprocess.Popen(
            cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed whole on timeout
        )  # fmt: skip
        out, timed_out = _wait(child, timeout_s)
    return _result(out, timed_out, child.returncode, start)


def run_command_sandboxed(
    argv: list[str], cwd: Path, *, timeout_s: float = 120.0, memory_mb: int = 4096
) -> SandboxResult:
    """A user's command (a repository's tests) in `cwd`, with the limits, the fresh environment and the network
    namespace above but not the audit hook (a test runner starts processes and writes caches); `python` is ours."""
    start = time.perf_counter()
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(cwd), "TMPDIR": str(cwd),
        "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
    }  # fmt: skip
    child = subprocess.Popen(
        _limited(argv, max(1, int(timeout_s)), memory_mb, 1024), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    out, timed_out = _wait(child, timeout_s)
    return _result(out, timed_out, child.returncode, start)


def _wait(child: subprocess.Popen[bytes], timeout_s: float) -> tuple[bytes, bool]:
    try:
        out, _ = child.communicate(timeout=timeout_s + 2)
        return out, child.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        return out, True


def _result(out: bytes, timed_out: bool, returncode: int, start: float) -> SandboxResult:
    text = out.decode("utf-8", "replace")[-OUTPUT_CHARS:]
    if timed_out:
        outcome: Outcome = "timed_out"
    elif returncode == 0:
        outcome = "passed"
    elif "PermissionError: sandbox:" in text:
        outcome = "blocked"
    else:
        outcome = "failed"
    return SandboxResult(outcome=outcome, seconds=round(time.perf_counter() - start, 3), output=text)
