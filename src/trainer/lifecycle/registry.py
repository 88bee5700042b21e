"""The runs a runner has seen: one `Tracked` per run, written by the scheduler (scheduler.py), read by the views
(views.py). It owns the in-memory copies and the cues that say one changed; the store stays the source of truth.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from .cues import Cues, RunUpdate
from .jobs import Job
from .process import WorkerProcess
from .run_log import read_events
from .store import RunStore
from .tracking import RunAspect, RunHistory, apply_event

#: finished runs from earlier sessions kept rebuilt in memory (each rebuild reads its events.jsonl)
REBUILT_CACHE = 32
STATUS = frozenset({RunAspect.STATUS})


@dataclass
class Tracked:
    """What the runner keeps in memory about a run it has seen this session."""

    job: Job
    history: RunHistory = field(default_factory=RunHistory)
    changed: anyio.Event = field(default_factory=anyio.Event)
    worker: WorkerProcess | None = None  # only for workers this runner started
    following: bool = False
    cancel_requested: bool = False
    shutting_down: bool = False
    stopping: bool = False  # a stop (SIGTERM, then SIGKILL if need be) is under way: later cancels join it
    done: anyio.Event = field(default_factory=anyio.Event)


class RunRegistry:
    """Tracked runs by id: the live ones this runner follows, and finished ones rebuilt from their events."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.live: dict[str, Tracked] = {}
        self._rebuilt: OrderedDict[str, Tracked] = OrderedDict()
        self.cues = Cues()

    def track(self, job: Job) -> Tracked:
        """The run's Tracked, made (and announced) the first time it is seen."""
        tracked = self.live.get(job.id)
        if tracked is None:
            tracked = self.live[job.id] = Tracked(job)
            self._rebuilt.pop(job.id, None)
            self.cues.publish(RunUpdate(job.id, STATUS, created=True))
        return tracked

    def replace(self, job: Job) -> Tracked:
        """A fresh Tracked for a run that starts again (resumed): its earlier attempt's copy is done with."""
        self._rebuilt.pop(job.id, None)
        tracked = self.live[job.id] = Tracked(job)
        self.touch(tracked, STATUS)
        return tracked

    def forget(self, run_id: str) -> None:
        self.live.pop(run_id, None)
        self._rebuilt.pop(run_id, None)

    def touch(self, tracked: Tracked, aspects: frozenset[RunAspect]) -> None:
        """Wake the run's waiters and cue its watchers."""
        tracked.changed.set()
        tracked.changed = anyio.Event()
        self.cues.publish(RunUpdate(tracked.job.id, aspects))

    def get(self, run_id: str) -> Tracked:
        """The run's Tracked: a live one (one another runner accepted since is tracked now, and the scheduler follows
        it at its next look), or a finished run from an earlier session rebuilt from its events.jsonl (and kept
        among the last REBUILT_CACHE such runs). RunNotFound (the store's) for an unknown id."""
        tracked = self.live.get(run_id)
        if tracked is not None:
            return tracked
        if run_id in self._rebuilt:
            self._rebuilt.move_to_end(run_id)
            return self._rebuilt[run_id]
        job = self.store.get(run_id)
        if not job.state.terminal:
            return self.track(job)
        tracked = Tracked(job)
        tracked.done.set()
        for event in read_events(Path(job.run_dir)):
            apply_event(tracked.job, tracked.history, event)
        self._rebuilt[run_id] = tracked
        while len(self._rebuilt) > REBUILT_CACHE:
            self._rebuilt.popitem(last=False)
        return tracked
