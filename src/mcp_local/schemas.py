"""Typed results of the tools and resources, and how each becomes a one-line summary plus the same JSON."""

from __future__ import annotations

from typing import Any

from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, Field

from trainer import (
    JobState,
    MemorySample,
    ModelInfo,
    ProcessMemory,
    RunAspect,
    RunPrediction,
    RunSnapshot,
    TrainReport,
    ValReport,
    WorkerMemory,
)


class RunStatus(RunSnapshot):
    """Everything needed to follow a run from this one result."""

    progress_percent: float = Field(description="iteration / iters * 100")
    recent_memory: list[MemorySample] = Field(description="The latest memory samples of the worker, oldest first.")
    resources: dict[str, str] = Field(description="URIs of this run's live resources.")


class RunList(BaseModel):
    runs: list[RunStatus]
    total_shown: int


class StartedRun(BaseModel):
    run_id: str
    state: JobState
    run_dir: str
    queue_position: int = Field(description="0 when it starts at once; n when n runs are ahead of it.")
    resources: dict[str, str]
    predicted_peak_gb: float | None = Field(description="Predicted peak memory of the run (GB).")
    memory_budget_gb: float | None = Field(description="The run's memory budget (GB); the watchdog enforces it.")
    next_step: str


class ResumedRun(BaseModel):
    run_id: str
    state: JobState
    attempt: int = Field(description="This run's attempt number now (the first run is attempt 1).")
    from_step: int = Field(description="Steps kept from the checkpoint; training continues after it (0: none).")
    checkpoint: str | None = Field(description="The checkpoint folder it continues from; null when it had none.")
    forced_changes: list[str] = Field(description="What changed since the checkpoint, resumed anyway (force).")
    queue_position: int = Field(description="0 when it starts at once; n when n runs are ahead of it.")
    next_step: str


class MemoryProfile(BaseModel):
    prediction: RunPrediction | None = Field(None, description="Present when a run config or model was given.")
    server: ProcessMemory
    loaded_models: list[ModelInfo]
    workers: list[WorkerMemory]
    system_total_gb: float
    system_available_gb: float


class RunMemoryResource(BaseModel):
    run_id: str
    interval_s: float = Field(description="The configured seconds between samples.")
    samples: list[MemorySample]


class RunMetricsResource(BaseModel):
    run_id: str
    train: list[TrainReport]
    validation: list[ValReport]


def run_uri(run_id: str, aspect: RunAspect) -> str:
    return f"runs://{run_id}/{aspect.value}"


def run_resources(run_id: str) -> dict[str, str]:
    return {aspect.value: run_uri(run_id, aspect) for aspect in RunAspect}


def tool_result(model: BaseModel, summary: str) -> CallToolResult:
    """Hosts differ: some models read only the text, others only the structured JSON; give both the same facts."""
    data: dict[str, Any] = model.model_dump(mode="json")
    text = summary + "\n" + model.model_dump_json(indent=1)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)
