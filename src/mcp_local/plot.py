"""runs://{run_id}/plot and run_status(include_plot): the run's loss and memory as a PNG."""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError

from trainer import RunNotFound, render_run_plot

from .state import AppState

PNG = "image/png"
PLOT_URI = "runs://{run_id}/plot"


def run_plot(state: AppState, run_id: str) -> bytes:
    snap = state.runner.get(run_id)
    train, validation = state.runner.reports(run_id)
    return render_run_plot(
        f"run {run_id}: {snap.state.value}, iteration {snap.iteration}/{snap.iters}",
        train,
        validation,
        state.runner.memory_samples(run_id),
        snap.metrics.predicted_peak_gb,
        snap.config.memory_budget_gb,
    )


def read_plot(run_id: str, ctx: Context[AppState, Any]) -> bytes:
    try:
        return run_plot(ctx.request_context.lifespan_context, run_id)
    except RunNotFound as exc:
        raise ResourceNotFoundError(str(exc)) from None


def register_plot_template(mcp: MCPServer[Any]) -> None:
    mcp.resource(
        PLOT_URI,
        name="plot",
        mime_type=PNG,
        description="PNG: train and validation loss, and memory (samples, prediction, budget) over iterations.",
    )(read_plot)
