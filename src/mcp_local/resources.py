"""runs://{run_id}/status, /memory and /metrics: templates for any run, plus concrete entries in resources/list."""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.server.mcpserver.resources import FunctionResource

from trainer import RunNotFound

from .schemas import RunMemoryResource, RunMetricsResource, RunStatus, run_resources
from .state import AppState

JSON = "application/json"
DESCRIPTIONS = {
    "status": "State, phase, iteration, losses, tokens/s, ETA, peak memory and latest memory samples of the run.",
    "memory": "Every memory sample of the run's worker (RSS, MLX active/peak/cache, system), oldest first.",
    "metrics": "The run's train and validation reports (loss, learning rate, it/s, tokens/s, trained tokens).",
}


def run_status(state: AppState, run_id: str, memory_samples: int = 10) -> RunStatus:
    snap = state.runner.get(run_id)
    pct = 100.0 * snap.iteration / snap.iters if snap.iters else 0.0
    return RunStatus(
        **snap.model_dump(),
        progress_percent=round(pct, 1),
        recent_memory=state.runner.memory_samples(run_id, memory_samples),
        resources=run_resources(run_id),
    )


def read_aspect(state: AppState, run_id: str, aspect: str) -> str:
    try:
        if aspect == "status":
            return run_status(state, run_id).model_dump_json(indent=1)
        if aspect == "memory":
            interval = float(state.runner.get(run_id).config.get("memory_sample_interval", 0.5))
            samples = state.runner.memory_samples(run_id)
            return RunMemoryResource(run_id=run_id, interval_s=interval, samples=samples).model_dump_json(indent=1)
        train, val = state.runner.reports(run_id)
        return RunMetricsResource(run_id=run_id, train=train, validation=val).model_dump_json(indent=1)
    except RunNotFound as exc:
        raise ResourceNotFoundError(str(exc)) from None


def register_run_resources(mcp: MCPServer[Any], state: AppState, run_id: str) -> None:
    """Concrete copies of the templates for one run, so that resources/list shows it."""
    for aspect, uri in run_resources(run_id).items():

        def read(aspect: str = aspect) -> str:
            return read_aspect(state, run_id, aspect)

        mcp.add_resource(
            FunctionResource.from_function(
                read, uri=uri, name=f"run {run_id} {aspect}", description=DESCRIPTIONS[aspect], mime_type=JSON
            )
        )


def register_resource_templates(mcp: MCPServer[Any]) -> None:
    @mcp.resource("runs://{run_id}/status", mime_type=JSON, description=DESCRIPTIONS["status"])
    def status(run_id: str, ctx: Context[AppState, Any]) -> str:
        return read_aspect(ctx.request_context.lifespan_context, run_id, "status")

    @mcp.resource("runs://{run_id}/memory", mime_type=JSON, description=DESCRIPTIONS["memory"])
    def memory(run_id: str, ctx: Context[AppState, Any]) -> str:
        return read_aspect(ctx.request_context.lifespan_context, run_id, "memory")

    @mcp.resource("runs://{run_id}/metrics", mime_type=JSON, description=DESCRIPTIONS["metrics"])
    def metrics(run_id: str, ctx: Context[AppState, Any]) -> str:
        return read_aspect(ctx.request_context.lifespan_context, run_id, "metrics")
