"""runs://{run_id}/status, /memory and /metrics: templates for any run, plus concrete entries in resources/list."""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.server.mcpserver.resources import FunctionResource

from trainer import DEFAULT_SAMPLE_INTERVAL_S, RunAspect, RunNotFound

from .schemas import RunMemoryResource, RunMetricsResource, RunStatus, run_resources, run_uri
from .state import AppState

JSON = "application/json"
DESCRIPTIONS = {
    RunAspect.STATUS: "State, phase, iteration, losses, tokens/s, ETA, peak memory and latest memory samples of the "
    "run.",
    RunAspect.MEMORY: "Every memory sample of the run's worker (RSS, MLX active/peak/cache, system), oldest first.",
    RunAspect.METRICS: "The run's train and validation reports (loss, learning rate, it/s, tokens/s, trained tokens).",
}


def run_status(state: AppState, run_id: str, memory_samples: int = 10) -> RunStatus:
    snap = state.runner.get(run_id)
    pct = 100.0 * snap.iteration / snap.iters if snap.iters else 0.0
    return RunStatus(
        **dict(snap),
        progress_percent=round(pct, 1),
        recent_memory=state.runner.memory_samples(run_id, memory_samples),
        resources=run_resources(run_id),
    )


def read_aspect(state: AppState, run_id: str, aspect: RunAspect) -> str:
    try:
        if aspect is RunAspect.STATUS:
            return run_status(state, run_id).model_dump_json(indent=1)
        if aspect is RunAspect.MEMORY:
            interval = state.runner.get(run_id).config.memory_sample_interval or DEFAULT_SAMPLE_INTERVAL_S
            samples = state.runner.memory_samples(run_id)
            return RunMemoryResource(run_id=run_id, interval_s=interval, samples=samples).model_dump_json(indent=1)
        train, val = state.runner.reports(run_id)
        return RunMetricsResource(run_id=run_id, train=train, validation=val).model_dump_json(indent=1)
    except RunNotFound as exc:
        raise ResourceNotFoundError(str(exc)) from None


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
