"""One worker subprocess: started in its own session with a private event pipe, read line by line, stopped.

The worker's stdout and stderr go to the run's worker.log, its events to a pipe of their own (fd N), so nothing MLX-LM
prints can reach the event channel. Its stdin stays open: EOF tells it that the parent is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.abc

log = logging.getLogger(__name__)
WORKER_MODULE = "trainer.lifecycle.worker"


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the worker's whole process group (it is its group's leader), so its children go too."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


class WorkerProcess:
    """Use `await WorkerProcess.start(...)`, then `events()` until EOF, then `wait()`; `close()` in any case."""

    def __init__(self, process: anyio.abc.Process, channel: BinaryIO, log_file: BinaryIO) -> None:
        self._process = process
        self._channel = channel
        self._log_file = log_file

    @classmethod
    async def start(cls, run_dir: Path, env: Mapping[str, str]) -> WorkerProcess:
        read_fd, write_fd = os.pipe()
        # a local file opened once per run: not worth a thread hop
        log_file = open(run_dir / "worker.log", "ab")  # noqa: ASYNC230, SIM115
        channel = os.fdopen(read_fd, "rb")
        try:
            process = await anyio.open_process(
                [sys.executable, "-m", WORKER_MODULE, str(run_dir), "--event-fd", str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=log_file,
                pass_fds=[write_fd],
                start_new_session=True,  # its own process group, so a stop reaches its children too
                env=dict(env),
            )
        except BaseException:
            channel.close()
            log_file.close()
            raise
        finally:
            os.close(write_fd)
        return cls(process, channel, log_file)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.returncode is None

    async def lines(self) -> AsyncIterator[bytes]:
        """The event channel's lines until EOF (the worker, and anything it started, closed it)."""
        while line := await anyio.to_thread.run_sync(self._channel.readline, abandon_on_cancel=True):
            yield line

    async def wait(self) -> int:
        return await self._process.wait()

    def signal(self, sig: signal.Signals) -> None:
        signal_group(self.pid, sig)

    def close(self) -> None:
        self._channel.close()
        self._log_file.close()

    async def stop(self, grace_s: float, gone: anyio.Event, what: str) -> None:
        """SIGTERM (the worker saves its adapter), then SIGKILL after `grace_s`; returns once `gone` is set."""
        log.info("%s: stopping worker %d", what, self.pid)
        self.signal(signal.SIGTERM)
        with anyio.move_on_after(grace_s):
            await gone.wait()
            return
        log.warning("%s: worker ignored SIGTERM for %.0fs; killing it", what, grace_s)
        self.signal(signal.SIGKILL)
        await gone.wait()
