"""The worker -> runner wire format: one versioned JSON object per line (docs/events.md).

The fields of `train_report` and `val_report` mirror mlx-lm's `TrainingCallback` dicts. Compatibility: a reader
accepts only its own `v`; adding an optional field keeps the version (readers ignore fields they do not know),
anything else bumps it. `seq` starts at 1 and increases by one per event of a worker.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .jobs import FailureKind, Phase

log = logging.getLogger(__name__)
#: 2: `stopped`; workers write events.jsonl themselves. 3: `resumed`, attempts. 4: `stopping`. 5: `replanned`.
#: 6: `packed`
WIRE_VERSION = 6
#: older versions whose events this one still reads (a subset of it), for runs recorded before an upgrade
READABLE_VERSIONS = frozenset({1, 2, 3, 4, 5, 6})


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int = WIRE_VERSION
    seq: int = 0
    ts: float = Field(default_factory=time.time)


class Started(_Event):
    type: Literal["started"] = "started"
    pid: int
    backend: str
    device: str = ""
    attempt: int = 1  # a resumed run's worker is its next attempt; its events follow the previous one's


class Resumed(_Event):
    """The worker continues from a checkpoint: steps after `iteration` are trained (again)."""

    type: Literal["resumed"] = "resumed"
    iteration: int
    path: str


class PhaseChanged(_Event):
    type: Literal["phase"] = "phase"
    phase: Phase


class Progress(_Event):
    """A training step began; sent at most a few times a second, between reports."""

    type: Literal["progress"] = "progress"
    iteration: int
    iters: int


class TrainReport(_Event):
    type: Literal["train_report"] = "train_report"
    iteration: int
    train_loss: float
    learning_rate: float
    iterations_per_second: float
    tokens_per_second: float
    trained_tokens: int
    peak_memory: float  # GB, as mlx-lm reports it
    #: grpo, over the report's steps: the mean reward (share of tests passed), the share of completions passing all
    #: their tests, the KL to the base, mean completion tokens and the seconds spent sampling and scoring
    reward: float | None = None
    pass_rate: float | None = None
    kl: float | None = None
    completion_tokens: float | None = None
    sample_seconds: float | None = None


class ValReport(_Event):
    type: Literal["val_report"] = "val_report"
    iteration: int
    val_loss: float
    val_time: float
    #: dpo and orpo: the share of validation pairs whose chosen reply the model prefers, the mean margin, and the
    #: mean log-probabilities of the chosen and rejected replies
    val_accuracy: float | None = None
    val_margin: float | None = None
    val_chosen_logp: float | None = None
    val_rejected_logp: float | None = None
    #: grpo: greedy completions of the validation tasks, their mean reward and share passing all tests (val_loss is
    #: 1 - val_reward)
    val_reward: float | None = None
    val_pass_rate: float | None = None


class MemorySample(_Event):
    """Memory of the worker process (of one rank, in a run of several processes) and of the system, in GB."""

    type: Literal["memory"] = "memory"
    rank: int = 0
    rss_gb: float
    active_gb: float
    peak_gb: float
    cache_gb: float
    system_total_gb: float
    system_available_gb: float


class Checkpoint(_Event):
    """A checkpoint folder the run can resume from; the adapter in `adapter_dir` is as of it."""

    type: Literal["checkpoint"] = "checkpoint"
    iteration: int
    path: str
    adapter_dir: str | None = None
    seconds: float | None = None  # how long writing it took: a stop waits for one such save


class Replanned(_Event):
    """The first-steps check chose another plan of the same step: in force after `iteration` (planning/replan.py)."""

    type: Literal["replanned"] = "replanned"
    iteration: int
    settings: dict[str, Any]
    measured_gb: float
    predicted_gb: float
    new_predicted_gb: float
    reason: str


class Packed(_Event):
    """A packed run's rows (engine/packing.py): how many records went into how many rows, and how full they are."""

    type: Literal["packed"] = "packed"
    records: int
    rows: int
    width: int
    filled: float


class Stopping(_Event):
    """The worker received SIGTERM and will stop at its next safe point (after the step in flight), then save."""

    type: Literal["stopping"] = "stopping"


class Finished(_Event):
    type: Literal["finished"] = "finished"
    adapter_path: str
    iterations: int


class Failed(_Event):
    type: Literal["failed"] = "failed"
    kind: FailureKind
    message: str
    adapter_path: str | None = None


class Stopped(_Event):
    """The worker stopped on SIGTERM (a cancel, or a server that stops its workers), its adapter saved if any."""

    type: Literal["stopped"] = "stopped"
    adapter_path: str | None = None


Event = Annotated[
    Started
    | Resumed
    | PhaseChanged
    | Progress
    | TrainReport
    | ValReport
    | MemorySample
    | Checkpoint
    | Replanned
    | Packed
    | Stopping
    | Finished
    | Failed
    | Stopped,
    Field(discriminator="type"),
]
_EVENT = TypeAdapter[Event](Event)


def encode_line(event: _Event) -> bytes:
    return event.model_dump_json().encode() + b"\n"


class WireError(ValueError):
    """A line that is not an event of this wire version, or out of sequence."""


def decode_line(line: bytes | str, *, older: bool = False) -> Event:
    """One event; raises WireError for another wire version (`older`: or a readable older one) and ValueError for
    anything that is not an event."""
    event = _EVENT.validate_json(line)
    if event.v != WIRE_VERSION and not (older and event.v in READABLE_VERSIONS):
        raise WireError(f"event of wire version {event.v}, this reader understands {WIRE_VERSION}")
    return event


class EventReader:
    """Decodes one worker's lines and checks that `seq` strictly increases (no replay, no reordering)."""

    def __init__(self) -> None:
        self.last_seq = 0

    def decode(self, line: bytes | str) -> Event:
        event = decode_line(line)
        if event.seq <= self.last_seq:
            raise WireError(f"event seq {event.seq} after {self.last_seq}: replayed or out of order")
        if event.seq != self.last_seq + 1:
            log.warning(
                "event seq jumped from %d to %d: %d events lost",
                self.last_seq,
                event.seq,
                event.seq - self.last_seq - 1,
            )
        self.last_seq = event.seq
        return event
