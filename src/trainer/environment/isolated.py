"""One MLX job in a child process (a GGUF import, a fuse, an export): a crash or a huge allocation there cannot take
the server down, and its memory is returned when it exits. A refused input exits with REFUSED_EXIT and its message as
stderr's last line; anything else is reported with how the child stopped."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Callable

from ..errors import ConfigError
from .process_env import mlx_child_environment

#: exit status of an isolated job that refused its input (its message is stderr's last line)
REFUSED_EXIT = 2


def run_isolated(module: str, args: list[str], *, what: str, hint: str) -> str:
    """Run `python -m module args`; returns its stdout, or raises ConfigError (the child's refusal, or how it died
    and `hint`, the fix to try)."""
    cmd = [sys.executable, "-m", module, *args]
    env = mlx_child_environment()
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False, env=env)
    if done.returncode == 0:
        return done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode == REFUSED_EXIT and lines:
        raise ConfigError(lines[-1])
    how = f"signal {signal.Signals(-done.returncode).name}" if done.returncode < 0 else f"status {done.returncode}"
    detail = f": {lines[-1]}" if lines else ""
    raise ConfigError(f"{what} stopped with {how}{detail}; {hint}")


def child_main(job: Callable[[list[str]], None], argv: list[str] | None = None) -> int:
    """The `main` of an isolated job: its arguments, logging to stderr, and a refusal as REFUSED_EXIT plus its
    message (the line `run_isolated` reports)."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    try:
        job(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return REFUSED_EXIT
    return 0
