"""The per-resource throttle of resources/updated: the first cue at once, then at most one per interval."""

from __future__ import annotations

import time

import anyio

from mcp_local.notify import Throttle

URIS = ("runs://a/memory", "runs://b/memory")
INTERVAL = 0.3


async def test_a_burst_of_cues_becomes_one_immediate_and_one_trailing_notification() -> None:
    sent: list[tuple[str, float]] = []
    trailing_sent = anyio.Event()

    async def send(uri: str) -> None:
        sent.append((uri, time.monotonic()))
        if len(sent) == 2 * len(URIS):
            trailing_sent.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            throttle = Throttle(tg, send, INTERVAL)
            for _ in range(20):  # a burst: only the first cue of each URI goes out now
                for uri in URIS:
                    await throttle(uri)
            assert [uri for uri, _ in sent] == list(URIS)
            await trailing_sent.wait()  # then one trailing notification each, carrying the latest state
    for uri in URIS:
        times = [t for u, t in sent if u == uri]
        assert len(times) == 2 and times[1] - times[0] >= INTERVAL
