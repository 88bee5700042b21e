"""The per-resource throttle of resources/updated: the first cue at once, then at most one per interval."""

from __future__ import annotations

import time

import anyio

from mcp_local.notify import Throttle


async def test_a_burst_of_cues_becomes_one_immediate_and_one_trailing_notification() -> None:
    sent: list[tuple[str, float]] = []

    async def send(uri: str) -> None:
        sent.append((uri, time.monotonic()))

    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        throttle = Throttle(tg, send, 0.5)
        for _ in range(20):
            await throttle("runs://a/memory")
            await throttle("runs://b/memory")
            await anyio.sleep(0.01)
    per_uri = {uri: [t - start for u, t in sent if u == uri] for uri in ("runs://a/memory", "runs://b/memory")}
    for times in per_uri.values():
        assert len(times) == 2  # 20 cues in 0.2 s: one at once, one trailing with the latest state
        assert times[0] < 0.1 and 0.45 <= times[1] - times[0] < 1.0
