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


def test_the_memory_resource_stays_bounded_however_long_the_run() -> None:
    from mcp_local.resources import OLDER_SAMPLES, RECENT_SAMPLES, memory_resource
    from trainer.lifecycle.events import MemorySample

    samples = [
        MemorySample(
            ts=1000.0 + 0.5 * i,
            rss_gb=1,
            active_gb=0.5,
            peak_gb=0.7,
            cache_gb=0,
            system_total_gb=24,
            system_available_gb=20,
        )  # fmt: skip
        for i in range(5000)
    ]
    body = memory_resource("r", 0.5, samples)
    assert len(body.samples) <= RECENT_SAMPLES + OLDER_SAMPLES and body.thinned == 5000 - len(body.samples)
    assert body.samples[0].t == 0 and body.samples[-1].t == 0.5 * 4999  # the oldest and the newest stay
    recent = [p.t for p in body.samples[-RECENT_SAMPLES:]]
    assert all(b - a == 0.5 for a, b in zip(recent, recent[1:], strict=False))  # the latest at full rate
    assert len(body.model_dump_json()) < 40_000 and body.system_total_gb == 24
