"""Cues to watchers (the MCP layer's notifications): which run changed, and which aspects of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .tracking import RunAspect


@dataclass(frozen=True)
class RunUpdate:
    """A cue that something about a run changed; watchers re-read what they need."""

    run_id: str
    aspects: frozenset[RunAspect]
    created: bool = False


class Cues:
    """Fan-out of RunUpdates to bounded streams; a slow watcher misses cues rather than slow the runner."""

    def __init__(self) -> None:
        self._watchers: set[MemoryObjectSendStream[RunUpdate]] = set()

    @asynccontextmanager
    async def watch(self, buffer: int = 256) -> AsyncIterator[MemoryObjectReceiveStream[RunUpdate]]:
        send, receive = anyio.create_memory_object_stream[RunUpdate](buffer)
        self._watchers.add(send)
        try:
            yield receive
        finally:
            self._watchers.discard(send)
            send.close()
            receive.close()

    def publish(self, update: RunUpdate) -> None:
        for send in list(self._watchers):
            try:
                send.send_nowait(update)
            except anyio.WouldBlock:
                pass
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                self._watchers.discard(send)
