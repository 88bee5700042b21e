"""Stopping a worker without losing its work: SIGTERM once, then as long as the step in flight and a save need.

A worker stops at its next safe point (after the step in flight) and saves a checkpoint; a step can take longer than
any fixed grace (a large batch on a CPU). So the wait follows the run: a worker that acknowledged the SIGTERM (its
`stopping` event) gets `STEP_FACTOR` times its longest measured step plus twice its longest save on top of the base
grace; before any step was measured it gets up to `UNMEASURED_CAP_S`, as long as its lease stays fresh. A worker
that does not acknowledge (it ignores SIGTERM, or is stopped or hung) is killed after the base grace, and so is one
whose lease goes stale (frozen) while it is waited for.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from .events import Checkpoint, Event, Progress, Stopping
from .leases import STALE_S, Lease
from .process import signal_group

log = logging.getLogger(__name__)
STEP_FACTOR = 2.0
#: the most a stop waits for a worker in its first, unmeasured step (compiling a large model's step included)
UNMEASURED_CAP_S = 1800.0
#: seconds between looks at the worker while waiting for it
CHECK_S = 0.25


@dataclass
class StopPace:
    """What a run's events say about how long a stop must wait: its steps, its saves, and the worker's ack."""

    longest_step_s: float | None = None
    longest_save_s: float = 0.0
    acknowledged_at: float | None = None
    _last_progress: tuple[int, float] | None = None

    def observe(self, event: Event) -> None:
        if isinstance(event, Progress):
            if self._last_progress is not None and event.iteration > self._last_progress[0]:
                it, ts = self._last_progress
                per_step = (event.ts - ts) / (event.iteration - it)
                self.longest_step_s = max(self.longest_step_s or 0.0, per_step)
            self._last_progress = (event.iteration, event.ts)
        elif isinstance(event, Checkpoint) and event.seconds is not None:
            self.longest_save_s = max(self.longest_save_s, event.seconds)
        elif isinstance(event, Stopping):
            self.acknowledged_at = event.ts

    def allowance_s(self, base_grace_s: float) -> float:
        """How long after the SIGTERM an acknowledged stop may take."""
        if self.longest_step_s is None:
            return UNMEASURED_CAP_S
        return base_grace_s + STEP_FACTOR * self.longest_step_s + 2 * self.longest_save_s


async def stop_worker(
    pid: int,
    pace: StopPace,
    base_grace_s: float,
    gone: anyio.Event,
    what: str,
    read_lease: Callable[[], Lease | None] | None = None,
) -> None:
    """SIGTERM to the worker's group, SIGKILL once the wait described above is over; returns once `gone`."""
    log.info("%s: stopping worker %d", what, pid)
    sent = time.time()
    signal_group(pid, signal.SIGTERM)
    while not gone.is_set():
        waited = time.time() - sent
        if waited >= base_grace_s:
            if pace.acknowledged_at is None:
                reason = f"it did not acknowledge SIGTERM within {base_grace_s:.0f} s"
                break
            allowance = pace.allowance_s(base_grace_s)
            if waited >= allowance:
                reason = f"it did not stop within {allowance:.0f} s (its measured steps and saves)"
                break
            current = read_lease() if read_lease is not None else None
            if current is not None and time.time() - current.heartbeat > STALE_S:
                reason = f"its lease was not renewed for {STALE_S:.0f} s (the process is stopped or hung)"
                break
        with anyio.move_on_after(CHECK_S):
            await gone.wait()
    else:
        return
    log.warning("%s: killing worker %d: %s", what, pid, reason)
    signal_group(pid, signal.SIGKILL)
    await gone.wait()
