"""Typed results of the tools and resources, and how each becomes a one-line summary plus the same JSON."""

from __future__ import annotations

from typing import Any

from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, Field

from trainer import (
    JobError,
    JobState,
    ModelInfo,
    Phase,
    ProcessMemory,
    RunAspect,
    RunMetrics,
    RunPrediction,
    StoredModel,
    TrainReport,
    ValReport,
    WorkerMemory,
)


class MemoryPoint(BaseModel):
    """One memory sample of the worker, in GB."""

    at: str = Field(description="ISO 8601 time (UTC).")
    rss_gb: float
    mlx_active_gb: float
    mlx_peak_gb: float
    rank: int | None = Field(None, description="The process, in a run of several.")


class RunStatus(BaseModel):
    """A run as an assistant follows it: times in ISO 8601 (UTC), memory in GB."""

    id: str
    state: JobState
    phase: Phase | None = None
    iteration: int
    iters: int
    progress_percent: float
    attempt: int = 1
    eta_seconds: float | None = None
    stalled_seconds: float | None = Field(None, description="Seconds the worker has been silent.")
    metrics: RunMetrics
    memory_budget_gb: float | None = None
    loss_trend: str | None = Field(None, description="Train loss sparkline.")
    created_at: str
    started_at: str | None = None
    ended_at: str | None = None
    adapter_path: str | None = None
    run_dir: str
    error: JobError | None = None
    evaluation: str | None = None
    recent_memory: list[MemoryPoint] = Field(default_factory=list, description="Latest samples, oldest first.")
    config: dict[str, Any] | None = Field(None, description="With include_config.")


class CancelledRun(BaseModel):
    id: str
    state: JobState
    iteration: int
    iters: int
    adapter_path: str | None = Field(None, description="The adapter saved when it stopped, if any.")
    run_dir: str


class RunBrief(BaseModel):
    """One run in a listing."""

    id: str
    state: JobState
    iteration: int
    iters: int
    last_val_loss: float | None = None
    adapter_path: str | None = None
    error: str | None = None
    created_at: str


class RunList(BaseModel):
    runs: list[RunBrief]
    total_shown: int


class StartedRun(BaseModel):
    run_id: str
    state: JobState
    run_dir: str
    queue_position: int = Field(description="Runs ahead of it.")
    resources: dict[str, str]
    predicted_peak_gb: float | None = Field(description="GB.")
    memory_budget_gb: float | None = Field(description="GB; the watchdog enforces it.")
    next_step: str


class ResumedRun(BaseModel):
    run_id: str
    state: JobState
    attempt: int = Field(description="1 for the first run.")
    from_step: int = Field(description="Steps kept from the checkpoint (0: none).")
    checkpoint: str | None = Field(description="The checkpoint folder it continues from.")
    forced_changes: list[str] = Field(description="Changes since the checkpoint, resumed anyway (force).")
    queue_position: int = Field(description="Runs ahead of it.")
    next_step: str


class MemoryProfile(BaseModel):
    prediction: RunPrediction | None = Field(None, description="With a config or model.")
    server: ProcessMemory
    loaded_models: list[ModelInfo]
    workers: list[WorkerMemory]
    system_total_gb: float
    system_available_gb: float


class ModelList(BaseModel):
    loaded: list[ModelInfo] = Field(description="Ready for generate.")
    imported: list[StoredModel] = Field(description="GGUF files imported as MLX folders.")
    hub_cache: list[StoredModel] = Field(description="Hub cache repos (offline by repo id).")


class SampledMemory(BaseModel):
    """One memory sample as the memory resource shows it (GB)."""

    t: float = Field(description="Seconds since the run's first sample.")
    rank: int = Field(description="Which process, in a run of several (0: the first).")
    rss_gb: float
    active_gb: float = Field(description="MLX's active memory.")
    peak_gb: float = Field(description="MLX's peak so far.")
    cache_gb: float = Field(description="MLX's buffer cache.")
    system_available_gb: float


class RunMemoryResource(BaseModel):
    run_id: str
    interval_s: float = Field(description="The configured seconds between samples.")
    system_total_gb: float | None = None
    thinned: int = Field(0, description="Older samples left out: the oldest are kept one in every few.")
    samples: list[SampledMemory]


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
    text = summary + "\n" + model.model_dump_json(exclude_none=True)  # compact: every byte is a model's token
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)
