"""What the store's state allows a new run: room in the queue, and an adapter folder no live run writes to."""

from __future__ import annotations

from ..errors import ConfigError
from ..planning.preflight import PreparedRun
from .jobs import JobState
from .store import RunStore


def admit(store: RunStore, prepared: PreparedRun, max_queued: int) -> None:
    """Raise ConfigError, naming the limit or the conflict, when the run may not be queued now."""
    queued = store.count(JobState.QUEUED)
    if queued >= max_queued:
        raise ConfigError(
            f"{queued} runs are queued already, the limit (max_queued={max_queued}, --max-queued); wait for some to "
            "start or cancel some"
        )
    wanted = prepared.config.adapter_dir
    if wanted and any(job.config.adapter_dir == wanted for job in store.live()):
        raise ConfigError(
            f"adapter_dir {wanted!r} is the adapter folder of a live run (queued or running); pick another"
        )
