"""runs://{run_id}/status, /memory and /metrics: templates for any run, plus concrete entries in resources/list."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.server.mcpserver.resources import FunctionResource

from trainer import DEFAULT_SAMPLE_INTERVAL_S, RunAspect, RunNotFound, evaluation_state

from .schemas import MemoryPoint, RunMemoryResource, RunMetricsResource, RunStatus, SampledMemory, run_uri
from .state import AppState

JSON = "application/json"
BARS = "▁▂▃▄▅▆▇█"
DESCRIPTIONS = {
    RunAspect.STATUS: "State, phase, iteration, losses, tokens/s, ETA, peak memory and latest memory samples of the "
    "run.",
    RunAspect.MEMORY: "Every memory sample of the run's worker (RSS, MLX active/peak/cache, system), oldest first.",
    RunAspect.METRICS: "The run's train and validation reports (loss, learning rate, it/s, tokens/s, trained tokens).",
}


def iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def sparkline(values: list[float], width: int = 24) -> str | None:
    """The values as block characters, for hosts that show only text (the latest `width` of them)."""
    values = values[-width:]
    if len(values) < 2:
        return None
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(BARS[round((v - low) / span * (len(BARS) - 1))] for v in values)


def run_status(state: AppState, run_id: str, memory_samples: int = 2, include_config: bool = False) -> RunStatus:
    snap = state.runner.get(run_id)
    train, _ = state.runner.reports(run_id)
    processes = snap.config.num_processes
    samples = state.runner.latest_memory(run_id, memory_samples)
    return RunStatus(
        id=snap.id,
        state=snap.state,
        phase=snap.phase,
        iteration=snap.iteration,
        iters=snap.iters,
        progress_percent=snap.progress_percent,
        attempt=snap.attempt,
        eta_seconds=None if snap.eta_seconds is None else round(snap.eta_seconds, 1),
        stalled_seconds=snap.stalled_seconds,
        metrics=snap.metrics,
        memory_budget_gb=snap.config.memory_budget_gb,
        loss_trend=sparkline([r.train_loss for r in train]),
        created_at=iso(snap.created_at) or "",
        started_at=iso(snap.started_at),
        ended_at=iso(snap.ended_at),
        adapter_path=snap.adapter_path,
        run_dir=snap.run_dir,
        error=snap.error,
        evaluation=_evaluation_summary(snap.run_dir) if snap.state.terminal else None,
        recent_memory=[
            MemoryPoint(
                at=iso(m.ts) or "",
                rss_gb=m.rss_gb,
                mlx_active_gb=m.active_gb,
                mlx_peak_gb=m.peak_gb,
                rank=m.rank if processes > 1 else None,
            )
            for m in samples
        ],
        config=snap.config.model_dump(mode="json") if include_config else None,
    )


def _evaluation_summary(run_dir: str) -> str | None:
    current = evaluation_state(Path(run_dir))
    return current.summary() if current else None


def status_line(state: AppState, status: RunStatus) -> str:
    """The run's one-line summary, with its loss trend."""
    line = state.runner.get(status.id).summary()
    return f"{line}, loss {status.loss_trend}" if status.loss_trend else line


#: the memory resource's latest samples at full rate, and at most this many older ones
RECENT_SAMPLES = 120
OLDER_SAMPLES = 120


def read_aspect(state: AppState, run_id: str, aspect: RunAspect) -> str:
    try:
        if aspect is RunAspect.STATUS:
            return run_status(state, run_id, memory_samples=10, include_config=True).model_dump_json(indent=1)
        if aspect is RunAspect.MEMORY:
            interval = state.runner.get(run_id).config.memory_sample_interval or DEFAULT_SAMPLE_INTERVAL_S
            return memory_resource(run_id, interval, state.runner.memory_samples(run_id)).model_dump_json()
        train, val = state.runner.reports(run_id)
        return RunMetricsResource(run_id=run_id, train=train, validation=val).model_dump_json(indent=1)
    except RunNotFound as exc:
        raise ResourceNotFoundError(str(exc)) from None


def memory_resource(run_id: str, interval: float, samples: list[Any]) -> RunMemoryResource:
    """Bounded however long the run: the latest RECENT_SAMPLES as taken, the older ones thinned to at most
    OLDER_SAMPLES; times as seconds since the first sample."""
    older, recent = samples[:-RECENT_SAMPLES], samples[-RECENT_SAMPLES:]
    step = max(1, -(-len(older) // OLDER_SAMPLES))
    kept = older[::step] + recent
    start = samples[0].ts if samples else 0.0
    points = [
        SampledMemory(
            t=round(s.ts - start, 2), rank=s.rank, rss_gb=round(s.rss_gb, 3), active_gb=round(s.active_gb, 3),
            peak_gb=round(s.peak_gb, 3), cache_gb=round(s.cache_gb, 3),
            system_available_gb=round(s.system_available_gb, 2),
        )
        for s in kept
    ]  # fmt: skip
    total = samples[-1].system_total_gb if samples else None
    return RunMemoryResource(
        run_id=run_id, interval_s=interval, system_total_gb=total, thinned=len(samples) - len(kept), samples=points
    )


def register_run_resources(mcp: MCPServer[Any], state: AppState, run_id: str) -> None:
    """Concrete copies of the templates for one run, so that resources/list shows it."""
    for aspect in RunAspect:

        def read(aspect: RunAspect = aspect) -> str:
            return read_aspect(state, run_id, aspect)

        mcp.add_resource(
            FunctionResource.from_function(
                read,
                uri=run_uri(run_id, aspect),
                name=f"run {run_id} {aspect.value}",
                description=DESCRIPTIONS[aspect],
                mime_type=JSON,
            )
        )


def read_status(run_id: str, ctx: Context[AppState, Any]) -> str:
    return read_aspect(ctx.request_context.lifespan_context, run_id, RunAspect.STATUS)


def read_memory(run_id: str, ctx: Context[AppState, Any]) -> str:
    return read_aspect(ctx.request_context.lifespan_context, run_id, RunAspect.MEMORY)


def read_metrics(run_id: str, ctx: Context[AppState, Any]) -> str:
    return read_aspect(ctx.request_context.lifespan_context, run_id, RunAspect.METRICS)


def register_resource_templates(mcp: MCPServer[Any]) -> None:
    readers = {RunAspect.STATUS: read_status, RunAspect.MEMORY: read_memory, RunAspect.METRICS: read_metrics}
    for aspect, reader in readers.items():
        uri = "runs://{run_id}/" + aspect.value
        mcp.resource(uri, name=aspect.value, mime_type=JSON, description=DESCRIPTIONS[aspect])(reader)
