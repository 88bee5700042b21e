"""The bridge from runner cues to MCP notifications, in both protocol eras, throttled per resource."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
import anyio.abc
from mcp.server.subscriptions import ResourcesListChanged, ResourceUpdated

from trainer import RunUpdate

from .schemas import run_uri
from .state import AppState

log = logging.getLogger(__name__)
MIN_INTERVAL_S = 0.5  # at most 2 updates a second per resource


async def publish_updated(state: AppState, uri: str) -> None:
    await state.bus.publish(ResourceUpdated(uri=uri))  # 2026-07-28 subscriptions/listen
    for session in list(state.legacy_subscriptions.get(uri, {}).values()):
        await session.send_resource_updated(uri)  # 2025-era resources/subscribe


async def publish_list_changed(state: AppState) -> None:
    await state.bus.publish(ResourcesListChanged())
    for session in list(state.legacy_sessions.values()):
        await session.send_resource_list_changed()


class Throttle:
    """Trailing-edge throttle per URI: the first update goes at once, later ones at most every `interval`."""

    def __init__(self, tg: anyio.abc.TaskGroup, send: Callable[[str], object], interval: float) -> None:
        self._tg = tg
        self._send = send
        self._interval = interval
        self._last: dict[str, float] = {}
        self._pending: set[str] = set()

    async def __call__(self, uri: str) -> None:
        if uri in self._pending:
            return
        wait = self._last.get(uri, 0.0) + self._interval - time.monotonic()
        if wait <= 0:
            await self._fire(uri)
        else:
            self._pending.add(uri)
            self._tg.start_soon(self._later, uri, wait)

    async def _later(self, uri: str, wait: float) -> None:
        await anyio.sleep(wait)
        self._pending.discard(uri)
        await self._fire(uri)

    async def _fire(self, uri: str) -> None:
        self._last[uri] = time.monotonic()
        await self._send(uri)  # type: ignore[misc]


async def bridge(state: AppState, on_created: Callable[[str], None]) -> None:
    """Forward runner cues until cancelled (the server's lifespan owns this task)."""
    async with anyio.create_task_group() as tg, state.runner.watch() as cues:

        async def send(uri: str) -> None:
            await publish_updated(state, uri)

        throttle = Throttle(tg, send, MIN_INTERVAL_S)
        update: RunUpdate
        async for update in cues:
            try:
                if update.created:
                    on_created(update.run_id)
                    await publish_list_changed(state)
                for aspect in sorted(update.aspects):
                    await throttle(run_uri(update.run_id, aspect))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):  # a client went away mid-send
                log.info("a subscriber disconnected while being notified")
