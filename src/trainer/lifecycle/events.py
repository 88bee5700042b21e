"""The worker -> runner wire format: one versioned JSON object per line.

The fields of `train_report` and `val_report` mirror mlx-lm's `TrainingCallback` dicts.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .jobs import FailureKind, Phase

WIRE_VERSION = 1


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


class ValReport(_Event):
    type: Literal["val_report"] = "val_report"
    iteration: int
    val_loss: float
    val_time: float


class MemorySample(_Event):
    """Memory of the worker process and of the system, in GB."""

    type: Literal["memory"] = "memory"
    rss_gb: float
    active_gb: float
    peak_gb: float
    cache_gb: float
    system_total_gb: float
    system_available_gb: float


class Checkpoint(_Event):
    type: Literal["checkpoint"] = "checkpoint"
    iteration: int
    path: str


class Finished(_Event):
    type: Literal["finished"] = "finished"
    adapter_path: str
    iterations: int


class Failed(_Event):
    type: Literal["failed"] = "failed"
    kind: FailureKind
    message: str
    adapter_path: str | None = None


Event = Annotated[
    Started | PhaseChanged | Progress | TrainReport | ValReport | MemorySample | Checkpoint | Finished | Failed,
    Field(discriminator="type"),
]
_EVENT = TypeAdapter[Event](Event)


def encode_line(event: _Event) -> bytes:
    return event.model_dump_json().encode() + b"\n"


def decode_line(line: bytes | str) -> Event:
    return _EVENT.validate_json(line)
