"""Worker processes: started in a session of their own (so they outlive the server), signalled as a group.

The worker's stdout and stderr go to the run's worker.log and its events to the run's events.jsonl, which the runner
follows (follow.py); its stdin is /dev/null, so the server's stdio closing (a host quitting) never reaches it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.abc

from ..entrypoints import WORKER

log = logging.getLogger(__name__)
WORKER_MODULE = WORKER


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the worker's whole process group (it is its group's leader), so its children go too."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


class WorkerProcess:
    """A worker this server started: `await WorkerProcess.start(...)`, then `wait()`; `close()` in any case."""

    def __init__(self, process: anyio.abc.Process, log_file: BinaryIO) -> None:
        self._process = process
        self._log_file = log_file

    @classmethod
    async def start(cls, run_dir: Path, db_path: Path, env: Mapping[str, str], attempt: int = 1) -> WorkerProcess:
        # a local file opened once per run: not worth a thread hop
        log_file = open(run_dir / "worker.log", "ab")  # noqa: ASYNC230, SIM115
        try:
            process = await anyio.open_process(
                [sys.executable, "-m", WORKER_MODULE, str(run_dir), "--db", str(db_path), "--attempt", str(attempt)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # its own session and process group: a stop reaches its children too
                env=dict(env),
            )
        except BaseException:
            log_file.close()
            raise
        return cls(process, log_file)

    @property
    def pid(self) -> int:
        return self._process.pid

    async def wait(self) -> int:
        return await self._process.wait()

    def close(self) -> None:
        self._log_file.close()
