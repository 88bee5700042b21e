"""The tools: thin adapters from MCP arguments to the trainer's API, each returning a summary line plus typed JSON.

Each tool is a module-level function (importable and testable on its own); `register_tools` adds them to a server.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ImageContent, ToolAnnotations
from pydantic import BaseModel, Field

from trainer import (
    Generation,
    JobState,
    ModelInfo,
    QLoRAConfig,
    RunPrediction,
    TrainerError,
    predict_model,
    predict_run,
    process_memory,
    sample_memory,
)

from .plot import PNG, run_plot
from .resources import iso, run_status, status_line
from .schemas import (
    CancelledRun,
    MemoryProfile,
    ResumedRun,
    RunBrief,
    RunList,
    RunStatus,
    StartedRun,
    run_resources,
    tool_result,
)
from .state import AppState

MAX_WAIT_S = 60.0  # some hosts background a call after 120 s
AppContext = Context[AppState, Any]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


def _local(*, read_only: bool = False, destructive: bool = False, idempotent: bool = False) -> ToolAnnotations:
    """Every tool acts on this machine only: never open-world. Hints equal to the spec's defaults (not read-only, not
    idempotent) are left out; destructive is said either way, since its default is true."""
    return ToolAnnotations(
        read_only_hint=True if read_only else None,
        destructive_hint=None if read_only else destructive,
        idempotent_hint=True if idempotent else None,
        open_world_hint=False,
    )


@contextmanager
def trainer_errors() -> Iterator[None]:
    """Our own errors are the caller's to fix: pass their message on as a tool error."""
    try:
        yield
    except TrainerError as exc:
        raise ToolError(str(exc)) from None


def _state(ctx: AppContext) -> AppState:
    state = ctx.request_context.lifespan_context
    session = ctx.request_context.session
    # 2.3 has no public per-connection key; the SDK's migration guide uses this one (see notify)
    state.legacy_sessions.setdefault(session._connection, session)
    return state


async def load_model(
    ctx: AppContext,
    path: Annotated[
        str, Field(description="A local model folder (MLX or Hugging Face layout), a .gguf file or a hub repo id.")
    ],
    adapter: Annotated[
        str | None, Field(description="Optional adapter folder (a run's adapter_path) to apply on top.")
    ] = None,
) -> Annotated[CallToolResult, ModelInfo]:
    """Load a model for generate (it stays loaded): architecture, parameters, quantization, load time, memory."""
    state = _state(ctx)
    with trainer_errors():
        info = await anyio.to_thread.run_sync(state.models.load, path, adapter)
    quant = f"{info.quantization.get('bits')}-bit" if info.quantization else "unquantized"
    summary = (
        f"loaded {info.architecture} model {info.model} ({info.parameters / 1e6:.1f}M parameters, {quant}) "
        f"in {info.load_seconds:.2f}s using {info.memory_gb:.2f} GB"
    )
    return tool_result(info, summary)


async def generate(
    ctx: AppContext,
    prompt: Annotated[str | None, Field(description="A user message; the model's chat template is applied.")] = None,
    messages: Annotated[
        list[ChatMessage] | None, Field(description="A chat instead of a prompt: [{role, content}, ...].")
    ] = None,
    max_tokens: Annotated[int, Field(ge=1, le=8192, description="Most tokens to generate.")] = 256,
    temperature: Annotated[float, Field(ge=0, le=2, description="0 is greedy.")] = 0.0,
    top_p: Annotated[float, Field(gt=0, le=1, description="Nucleus sampling.")] = 1.0,
    seed: Annotated[int | None, Field(description="Seed for sampling.")] = None,
    adapter: Annotated[str | None, Field(description="Adapter folder to apply to the loaded model.")] = None,
    run_id: Annotated[
        str | None, Field(description="Use this run's base model and adapter (instead of `adapter`).")
    ] = None,
) -> Annotated[CallToolResult, Generation]:
    """Generate with the loaded model, optionally through an adapter or a run's (run_id): text, tokens, tokens/s."""
    state = _state(ctx)
    model: str | None = None
    if run_id is not None and adapter is not None:
        raise ToolError("pass either adapter or run_id, not both")
    with trainer_errors():
        if run_id is not None:
            model, adapter = state.runner.adapter_for(run_id)
        chat = [m.model_dump() for m in messages] if messages is not None else None
        result = await anyio.to_thread.run_sync(
            lambda: state.models.generate(
                prompt,
                chat,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                adapter=adapter,
                model=model,
            )
        )
    summary = (
        f"generated {result.generation_tokens} tokens at {result.tokens_per_second:.1f} tok/s "
        f"(prompt {result.prompt_tokens} tokens, stop: {result.finish_reason})"
    )
    return tool_result(result, summary)


async def _prediction(
    state: AppState, config: QLoRAConfig | None, model: str | None, settings: dict[str, Any]
) -> RunPrediction | None:
    defaults = state.settings.run_defaults()
    if config is not None:
        return await anyio.to_thread.run_sync(predict_run, config, defaults)
    if model is not None:
        return await anyio.to_thread.run_sync(predict_model, model, settings, defaults)
    return None


async def profile_memory(
    ctx: AppContext,
    config: Annotated[
        dict[str, Any] | None,
        Field(description="A start_qlora_run config: predict its peak memory (nothing is started)."),
    ] = None,
    model: Annotated[str | None, Field(description="Or a model, with the settings below.")] = None,
    batch_size: Annotated[int, Field(ge=1)] = 4,
    seq_len: Annotated[int, Field(ge=8, description="Tokens per example.")] = 2048,
    num_layers: Annotated[int, Field(ge=-1, description="LoRA layers; -1 for all.")] = 16,
    rank: Annotated[int, Field(ge=1)] = 16,
    grad_checkpoint: bool = False,
    chunked_loss: bool = False,
) -> Annotated[CallToolResult, MemoryProfile]:
    """Memory (RSS, MLX active/peak/cache) of the server, loaded models, training workers and the system. Given a
    run config, or a model and the settings below, also the predicted peak by part against the budget (no weights
    loaded)."""
    state = _state(ctx)
    settings = {
        "batch_size": batch_size,
        "max_seq_length": seq_len,
        "num_layers": num_layers,
        "rank": rank,
        "grad_checkpoint": grad_checkpoint,
        "chunked_loss": chunked_loss,
    }
    with trainer_errors():
        run_config = QLoRAConfig.parse(config) if config is not None else None
        prediction = await _prediction(state, run_config, model, settings)
    system = sample_memory()
    profile = MemoryProfile(
        prediction=prediction,
        server=process_memory(),
        loaded_models=state.models.loaded_models(),
        workers=state.runner.worker_memory(),
        system_total_gb=system.system_total_gb,
        system_available_gb=system.system_available_gb,
    )
    predicted = ""
    if prediction is not None:
        verdict = "fits" if prediction.fits else "does NOT fit"
        predicted = (
            f"predicted peak {prediction.prediction.total_gb:.2f} GB {verdict} the budget of "
            f"{prediction.budget_gb:.2f} GB; "
        )
    summary = predicted + (
        f"server RSS {profile.server.rss_gb:.2f} GB (MLX active {profile.server.mlx_active_gb or 0:.2f} GB), "
        f"{len(profile.loaded_models)} model(s) loaded, {len(profile.workers)} live worker(s), system "
        f"{system.system_available_gb:.1f} of {system.system_total_gb:.1f} GB available"
    )
    return tool_result(profile, summary)


async def start_qlora_run(ctx: AppContext, config: QLoRAConfig) -> Annotated[CallToolResult, StartedRun]:
    """Validate a QLoRA config and queue the run; returns its run_id at once. Follow it with run_status(run_id,
    wait_seconds=30) or the runs://{run_id}/... resources."""
    state = _state(ctx)
    with trainer_errors():
        snap = await state.runner.submit(config)
    started = StartedRun(
        run_id=snap.id,
        state=snap.state,
        run_dir=snap.run_dir,
        queue_position=state.runner.queue_position(snap.id),
        resources=run_resources(snap.id),
        predicted_peak_gb=snap.metrics.predicted_peak_gb,
        memory_budget_gb=snap.config.memory_budget_gb,
        next_step=f"call run_status with run_id={snap.id!r} and wait_seconds=30 until the state is final",
    )
    predicted = (
        f", predicted peak {snap.metrics.predicted_peak_gb:.2f} GB of a {started.memory_budget_gb:.2f} GB budget"
        if snap.metrics.predicted_peak_gb is not None and started.memory_budget_gb is not None
        else ""
    )
    return tool_result(started, f"run {snap.id} queued ({snap.iters} iterations{predicted}); folder {snap.run_dir}")


async def run_status_tool(
    ctx: AppContext,
    run_id: Annotated[str, Field(description="The id start_qlora_run returned.")],
    wait_seconds: Annotated[
        float,
        Field(
            ge=0,
            description="Long-poll up to this many seconds (max 60) for a state or phase change, a report or an "
            "error; 0: at once.",
        ),
    ] = 0,
    memory_samples: Annotated[int, Field(ge=0, le=200, description="How many latest memory samples.")] = 2,
    include_config: Annotated[bool, Field(description="Also return the run's config.")] = False,
    include_plot: Annotated[
        bool, Field(description="Also return a PNG of loss and memory over iterations (runs://{id}/plot).")
    ] = False,
) -> Annotated[CallToolResult, RunStatus]:
    """A run's state, phase, iteration, losses, tokens/s, ETA, memory against prediction and budget, adapter and
    error: enough to follow it to the end."""
    state = _state(ctx)
    with trainer_errors():
        snap = state.runner.get(run_id)
        wait = min(wait_seconds, MAX_WAIT_S)
        if wait > 0 and not snap.state.terminal:
            sent = float(snap.iteration)
            await ctx.report_progress(sent, snap.iters, f"{snap.state.value}, iteration {snap.iteration}")
            snap = await state.runner.wait_for_change(run_id, wait)
            if snap.iteration > sent:  # progress must strictly increase
                await ctx.report_progress(snap.iteration, snap.iters, f"{snap.state.value}, iteration {snap.iteration}")
        status = run_status(state, run_id, memory_samples, include_config)
        result = tool_result(status, status_line(state, status))
        if include_plot:
            png = await anyio.to_thread.run_sync(run_plot, state, run_id)
            result.content.append(ImageContent(type="image", data=base64.b64encode(png).decode(), mime_type=PNG))
    return result


async def cancel_run(
    ctx: AppContext, run_id: Annotated[str, Field(description="The run to stop.")]
) -> Annotated[CallToolResult, CancelledRun]:
    """Cancel a queued run, or stop a running one (its adapter so far is saved); returns when its worker process is
    gone."""
    state = _state(ctx)
    with trainer_errors():
        await state.runner.cancel(run_id)
        snap = state.runner.get(run_id)
    cancelled = CancelledRun(
        id=snap.id,
        state=snap.state,
        iteration=snap.iteration,
        iters=snap.iters,
        adapter_path=snap.adapter_path,
        run_dir=snap.run_dir,
    )
    return tool_result(cancelled, snap.summary())


async def resume_run(
    ctx: AppContext,
    run_id: Annotated[str, Field(description="A run that failed or was cancelled.")],
    force: Annotated[
        bool, Field(description="Resume even if the dataset or the base model changed since the checkpoint.")
    ] = False,
) -> Annotated[CallToolResult, ResumedRun]:
    """Continue a failed, cancelled or interrupted run from its newest verified checkpoint, exactly as if never
    stopped (same run id, next attempt). Refused if its data or base model changed since, unless force."""
    state = _state(ctx)
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
        next_step=f"call run_status with run_id={snap.id!r} and wait_seconds=30 until the state is final",
    )
    return tool_result(resumed, f"{plan.describe()}; attempt {snap.attempt}, {snap.state.value}")


async def list_runs(
    ctx: AppContext,
    state: Annotated[JobState | None, Field(description="Only runs in this state.")] = None,
    limit: Annotated[int, Field(ge=1, le=200, description="Most runs to return, newest first.")] = 20,
) -> Annotated[CallToolResult, RunList]:
    """Runs, newest first (id, state, iteration, last validation loss, adapter, error), optionally in one state."""
    app = _state(ctx)
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


Tool = Callable[..., Awaitable[CallToolResult]]
TOOLS: dict[str, tuple[Tool, str, ToolAnnotations]] = {
    "load_model": (load_model, "Load model", _local(idempotent=True)),
    "generate": (generate, "Generate", _local(read_only=True)),
    "profile_memory": (profile_memory, "Profile memory", _local(read_only=True)),
    "start_qlora_run": (start_qlora_run, "Start QLoRA run", _local()),
    "run_status": (run_status_tool, "Run status", _local(read_only=True, idempotent=True)),
    "cancel_run": (cancel_run, "Cancel run", _local(destructive=True)),
    "resume_run": (resume_run, "Resume run", _local()),
    "list_runs": (list_runs, "List runs", _local(read_only=True, idempotent=True)),
}


def description(tool: Tool) -> str:
    """A tool's description is its docstring, on one line."""
    return " ".join((tool.__doc__ or "").split())


def register_tools(mcp: MCPServer[Any]) -> None:
    for name, (tool, title, hints) in TOOLS.items():
        mcp.tool(name=name, title=title, description=description(tool), annotations=hints)(tool)
