"""The run tools: start, follow, cancel, resume, list and delete QLoRA runs."""

from __future__ import annotations

import base64
from typing import Annotated

import anyio
from mcp.types import CallToolResult, ImageContent
from pydantic import Field

from trainer import DeletedRun, JobState, QLoRAConfig, WaitFor

from .plot import PNG, run_plot
from .resources import iso, run_status, status_line
from .schemas import CancelledRun, ResumedRun, RunBrief, RunList, RunStatus, StartedRun, run_resources, tool_result
from .state import AppState
from .tool_support import MAX_WAIT_S, AppContext, app_state, progress_from_thread, trainer_errors

PROGRESS_EVERY_S = 1.0


async def start_qlora_run(ctx: AppContext, config: QLoRAConfig) -> Annotated[CallToolResult, StartedRun]:
    """Check a config and queue the run; returns at once. Follow: run_status(run_id, wait_seconds=60,
    until="end")."""
    state = app_state(ctx)
    with trainer_errors():
        snap = await state.runner.submit(config, progress_from_thread(ctx, "reading the dataset"))
    started = StartedRun(
        run_id=snap.id,
        state=snap.state,
        run_dir=snap.run_dir,
        queue_position=state.runner.queue_position(snap.id),
        resources=run_resources(snap.id),
        predicted_peak_gb=snap.metrics.predicted_peak_gb,
        memory_budget_gb=snap.config.memory_budget_gb,
        next_step=f"call run_status with run_id={snap.id!r}, wait_seconds=60, until='end' until the state is final",
    )
    predicted = (
        f", predicted peak {snap.metrics.predicted_peak_gb:.2f} GB of a {started.memory_budget_gb:.2f} GB budget"
        if snap.metrics.predicted_peak_gb is not None and started.memory_budget_gb is not None
        else ""
    )
    return tool_result(started, f"run {snap.id} queued ({snap.iters} iterations{predicted}); folder {snap.run_dir}")


async def run_status_tool(
    ctx: AppContext,
    run_id: Annotated[str, Field(description="From start_qlora_run.")],
    wait_seconds: Annotated[float, Field(ge=0, le=MAX_WAIT_S, description="Seconds to wait for `until`.")] = 0,
    until: Annotated[
        WaitFor,
        Field(description="change: any report; a stall or error always ends the wait."),
    ] = "change",
    memory_samples: Annotated[int, Field(ge=0, le=200, description="Latest memory samples.")] = 2,
    include_config: Annotated[bool, Field(description="Add the config.")] = False,
    include_plot: Annotated[bool, Field(description="Add a loss and memory PNG.")] = False,
) -> Annotated[CallToolResult, RunStatus]:
    """A run's state, losses, speed, ETA, memory vs prediction; waits if asked."""
    state = app_state(ctx)
    with trainer_errors():
        snap = state.runner.get(run_id)
        wait = min(wait_seconds, MAX_WAIT_S)
        if wait > 0 and not snap.state.terminal:
            await _wait_reporting_progress(ctx, state, run_id, wait, until)
        status = run_status(state, run_id, memory_samples, include_config)
        result = tool_result(status, status_line(state, status))
        if include_plot:
            png = await anyio.to_thread.run_sync(run_plot, state, run_id)
            result.content.append(ImageContent(type="image", data=base64.b64encode(png).decode(), mime_type=PNG))
    return result


async def _wait_reporting_progress(ctx: AppContext, state: AppState, run_id: str, wait: float, until: WaitFor) -> None:
    """The long-poll, with a progress notification (iteration of total) each PROGRESS_EVERY_S the run advanced:
    hosts that ignore resources still see it move while the call waits."""
    done = anyio.Event()
    sent = -1.0

    async def report() -> None:
        nonlocal sent
        snap = state.runner.get(run_id)
        if snap.iteration > sent:  # progress must strictly increase
            sent = float(snap.iteration)
            await ctx.report_progress(sent, snap.iters, f"{snap.state.value}, iteration {snap.iteration}")

    async def wait_then_stop() -> None:
        await state.runner.wait_for_change(run_id, wait, until)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_then_stop)
        while not done.is_set():
            await report()
            with anyio.move_on_after(PROGRESS_EVERY_S):
                await done.wait()
    await report()


async def cancel_run(
    ctx: AppContext, run_id: Annotated[str, Field(description="The run to stop.")]
) -> Annotated[CallToolResult, CancelledRun]:
    """Stop a queued or running run (adapter saved); returns once stopped."""
    state = app_state(ctx)
    with trainer_errors():
        await state.runner.cancel(run_id)
        snap = state.runner.get(run_id)
    cancelled = CancelledRun.model_validate(snap.model_dump(include=set(CancelledRun.model_fields)))
    return tool_result(cancelled, snap.summary())


async def resume_run(
    ctx: AppContext,
    run_id: Annotated[str, Field(description="A failed or cancelled run.")],
    force: Annotated[bool, Field(description="Even if its data or model changed.")] = False,
) -> Annotated[CallToolResult, ResumedRun]:
    """Continue a failed or cancelled run from its newest checkpoint; refused if data or model changed, unless
    force."""
    state = app_state(ctx)
    with trainer_errors():
        snap, plan = await state.runner.resume(run_id, force)
    resumed = ResumedRun(
        run_id=snap.id,
        state=snap.state,
        attempt=snap.attempt,
        from_step=plan.step,
        checkpoint=plan.checkpoint,
        forced_changes=plan.changed,
        queue_position=state.runner.queue_position(snap.id),
        next_step=f"call run_status with run_id={snap.id!r}, wait_seconds=60, until='end' until the state is final",
    )
    return tool_result(resumed, f"{plan.describe()}; attempt {snap.attempt}, {snap.state.value}")


async def list_runs(
    ctx: AppContext,
    state: Annotated[JobState | None, Field(description="Only runs in this state.")] = None,
    limit: Annotated[int, Field(ge=1, le=200, description="Most runs to return.")] = 20,
) -> Annotated[CallToolResult, RunList]:
    """Runs, newest first: state, progress, last validation loss, adapter."""
    app = app_state(ctx)
    snaps = app.runner.list_runs(state, limit)
    briefs = [
        RunBrief(
            id=s.id,
            state=s.state,
            iteration=s.iteration,
            iters=s.iters,
            last_val_loss=s.metrics.last_val_loss,
            adapter_path=s.adapter_path,
            error=s.error.message if s.error else None,
            created_at=iso(s.created_at) or "",
        )
        for s in snaps
    ]
    lines = [f"{b.id} {b.state.value} {b.iteration}/{b.iters}" for b in briefs] or ["no runs"]
    return tool_result(RunList(runs=briefs, total_shown=len(briefs)), f"{len(briefs)} run(s): " + ", ".join(lines))


async def delete_run(
    ctx: AppContext, run_id: Annotated[str, Field(description="An ended run.")]
) -> Annotated[CallToolResult, DeletedRun]:
    """Delete an ended run and the files it wrote (not while live)."""
    state = app_state(ctx)
    with trainer_errors():
        deleted = await state.runner.delete(run_id)
    return tool_result(deleted, f"deleted run {run_id}: {len(deleted.removed)} folder(s), {deleted.freed_gb:.3f} GB")
