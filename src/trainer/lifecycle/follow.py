"""Following one live run: its events.jsonl as the worker appends to it, and whether its worker is still there.

Every server on a home follows every live run the same way, whether it started the worker or adopted it after a
restart: from the first line of events.jsonl (so the history has no gap and no duplicate), until the worker has
ended. The worker's end is seen from the process itself when this server started it (its exit status), else from
its lease (the pid with its start time), checked every poll.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from .events import Event, EventReader, Failed, Finished, Started, Stopped
from .leases import Lease

log = logging.getLogger(__name__)
#: seconds between looks at events.jsonl and at the worker's liveness
POLL_S = 0.1
#: a run marked running with no lease yet is a worker still starting for this long (then it never started)
START_GRACE_S = 30.0

LeaseReader = Callable[[], Lease | None]


class EventTail:
    """Reads the complete lines appended to a run's events.jsonl since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[bytes]:
        try:
            with self.path.open("rb") as events:
                events.seek(self._offset)
                data = events.read()
        except FileNotFoundError:  # the worker has not written its first event yet
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for its end
        return [line + b"\n" for line in lines if line.strip()]


@dataclass
class Liveness:
    """How the follower knows the worker is gone: its exit (our child) or its lease (any worker)."""

    read_lease: LeaseReader
    claimed_at: float = field(default_factory=time.time)
    exited: anyio.Event | None = None  # set when our own child exited
    exit_code: int | None = None

    def gone(self, reported_end: bool) -> bool:
        if self.exited is not None:
            return self.exited.is_set()
        lease = self.read_lease()
        if lease is not None:
            return not lease.alive()
        # no lease: dropped at the worker's very end, never taken (it died starting), or not taken yet
        return reported_end or time.time() - self.claimed_at > START_GRACE_S


async def follow_events(
    run_id: str, events_path: Path, liveness: Liveness, apply: Callable[[Event], None], attempt: int = 1
) -> Event | None:
    """Apply each event of the run as it is written, until the worker of `attempt` is gone; returns that worker's
    last Finished, Failed or Stopped event (None if it ended without one). A resumed run's events.jsonl holds every
    attempt's events in turn; the earlier attempts' ends are history, not this worker's."""
    tail, reader = EventTail(events_path), EventReader()
    last: Event | None = None
    current = 1
    while True:
        ended = liveness.gone(last is not None)  # looked at before reading, so the final read sees everything it wrote
        for line in tail.read():
            try:
                event = reader.decode(line)
            except ValueError as exc:
                log.warning("run %s: ignoring an event line (%s): %r", run_id, exc, line[:200])
                continue
            if isinstance(event, Started):
                current, last = event.attempt, None
            elif isinstance(event, Finished | Failed | Stopped) and current == attempt:
                last = event
            apply(event)
        if ended:
            return last
        await anyio.sleep(POLL_S)
