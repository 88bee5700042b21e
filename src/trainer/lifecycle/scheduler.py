"""The queue: runs start in the order they were accepted, at most `max_concurrent` at a time."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc


class Scheduler:
    """FIFO with a concurrency limit; `run` starts each run's task in the runner's task group when a slot frees."""

    def __init__(self, max_concurrent: int) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent={max_concurrent} must be at least 1")
        self.max_concurrent = max_concurrent
        self._queue: deque[str] = deque()
        self._running: set[str] = set()
        self._wake = anyio.Event()

    def enqueue(self, run_id: str) -> None:
        self._queue.append(run_id)
        self._wake.set()

    def remove(self, run_id: str) -> bool:
        """Take a queued run out of the queue; False when it is not queued (it may have just started)."""
        try:
            self._queue.remove(run_id)
        except ValueError:
            return False
        return True

    def position(self, run_id: str) -> int:
        """How many runs start before this one: those running now and those ahead of it in the queue."""
        ahead = self._queue.index(run_id) if run_id in self._queue else 0
        return len(self._running) + ahead if run_id in self._queue else 0

    @property
    def running(self) -> frozenset[str]:
        return frozenset(self._running)

    def done(self, run_id: str) -> None:
        self._running.discard(run_id)
        self._wake.set()

    async def run(self, tg: anyio.abc.TaskGroup, start: Callable[[str], Coroutine[Any, Any, None]]) -> None:
        """Start queued runs as slots free up, until cancelled."""
        while True:
            while self._queue and len(self._running) < self.max_concurrent:
                run_id = self._queue.popleft()
                self._running.add(run_id)
                tg.start_soon(start, run_id)
            await self._wake.wait()
            self._wake = anyio.Event()
