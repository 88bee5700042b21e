"""The tools: thin adapters from MCP arguments to the trainer, each returning a summary line plus typed JSON."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import anyio
import psutil
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field

from trainer import JobState, QLoRAConfig, TrainerError, sample_memory
from trainer.engine.inference import Generation, ModelInfo

from .predict import predict_for_config, predict_for_model
from .resources import run_status
from .schemas import (
    MemoryProfile,
    ProcessMemory,
    RunList,
    RunStatus,
    StartedRun,
    WorkerMemory,
    run_resources,
    summarize_run,
    tool_result,
)
from .state import AppState

DESCRIPTIONS = {
    "load_model": "Load a model (and keep it loaded) for generate. Returns architecture, parameter count, "
    "quantization, load time, memory used and how many layers decode through our CPU kernels.",
    "generate": "Generate text with the loaded model, optionally through a fine-tuned adapter or a run's adapter "
    "(run_id). Returns the text, token counts and tokens/s.",
    "profile_memory": "A memory snapshot of the server, of each loaded model and of every live training worker "
    "(RSS, MLX active/peak/cache, system total/available). Given a run config (or a model plus batch size, sequence "
    "length, LoRA layers, rank, checkpointing), also the run's predicted peak by part against its memory budget, "
    "without loading weights.",
    "start_qlora_run": "Validate a QLoRA config and queue the run; returns its run_id at once (training never "
    "blocks the call). Follow it with run_status(run_id, wait_seconds=30) or the runs://{run_id}/... resources.",
    "run_status": "State, phase, iteration of total, train/val loss, tokens/s, ETA, peak memory, the latest memory "
    "samples, adapter path and error of one run. Enough on its own to follow a run to the end.",
    "cancel_run": "Cancel a queued run, or stop a running one (its adapter so far is saved); returns when its "
    "worker process is gone.",
    "list_runs": "Runs, newest first, optionally only those in one state.",
}

MAX_WAIT_S = 60.0  # some hosts background a call after 120 s


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


def _local(*, read_only: bool = False, destructive: bool = False, idempotent: bool = False) -> ToolAnnotations:
    """Every tool acts on this machine only: never open-world."""
    return ToolAnnotations(
        read_only_hint=read_only, destructive_hint=destructive, idempotent_hint=idempotent, open_world_hint=False
    )


@contextmanager
def trainer_errors() -> Iterator[None]:
    """Our own errors are the caller's to fix: pass their message on as a tool error."""
    try:
        yield
    except TrainerError as exc:
        raise ToolError(str(exc)) from None


def _state(ctx: Context[AppState, Any]) -> AppState:
    state = ctx.request_context.lifespan_context
    session = ctx.request_context.session
    # 2.3 has no public per-connection key; the SDK's migration guide uses this one (see notify)
    state.legacy_sessions.setdefault(session._connection, session)
    return state


def register_tools(mcp: MCPServer[Any]) -> None:
    @mcp.tool(
        description=DESCRIPTIONS["load_model"],
        title="Load model",
        annotations=_local(idempotent=True),
    )
    async def load_model(
        ctx: Context[AppState, Any],
        path: Annotated[str, Field(description="Local model folder (MLX or Hugging Face layout, with config.json).")],
        adapter: Annotated[
            str | None, Field(description="Optional adapter folder (a run's adapter_path) to apply on top.")
        ] = None,
    ) -> Annotated[CallToolResult, ModelInfo]:
        state = _state(ctx)
        with trainer_errors():
            info = await anyio.to_thread.run_sync(state.models.load, path, adapter)
        quant = f"{info.quantization.get('bits')}-bit" if info.quantization else "unquantized"
        summary = (
            f"loaded {info.architecture} model {info.model} ({info.parameters / 1e6:.1f}M parameters, {quant}) "
            f"in {info.load_seconds:.2f}s using {info.memory_gb:.2f} GB"
        )
        return tool_result(info, summary)

    @mcp.tool(
        description=DESCRIPTIONS["generate"],
        title="Generate",
        annotations=_local(read_only=True),
    )
    async def generate(
        ctx: Context[AppState, Any],
        prompt: Annotated[
            str | None, Field(description="A user message; the model's chat template is applied.")
        ] = None,
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
        state = _state(ctx)
        model: str | None = None
        with trainer_errors():
            if run_id is not None:
                if adapter is not None:
                    raise ToolError("pass either adapter or run_id, not both")
                snap = state.runner.get(run_id)
                if not snap.adapter_path:
                    raise ToolError(
                        f"run {run_id} has no adapter yet (it is {snap.state.value}); wait until it has saved "
                        "a checkpoint or succeeded (run_status shows adapter_path)"
                    )
                model, adapter = str(snap.config["model"]), snap.adapter_path
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

    @mcp.tool(
        description=DESCRIPTIONS["profile_memory"],
        title="Profile memory",
        annotations=_local(read_only=True),
    )
    async def profile_memory(
        ctx: Context[AppState, Any],
        config: Annotated[
            QLoRAConfig | None, Field(description="Predict this run's peak memory (nothing is started).")
        ] = None,
        model: Annotated[
            str | None, Field(description="Or predict for this model with the settings below (no data needed).")
        ] = None,
        batch_size: Annotated[int, Field(ge=1)] = 4,
        seq_len: Annotated[int, Field(ge=8, description="Tokens per example.")] = 2048,
        num_layers: Annotated[int, Field(ge=-1, description="LoRA layers; -1 for all.")] = 16,
        rank: Annotated[int, Field(ge=1)] = 16,
        grad_checkpoint: bool = False,
        chunked_loss: bool = False,
    ) -> Annotated[CallToolResult, MemoryProfile]:
        state = _state(ctx)
        prediction = None
        with trainer_errors():
            if config is not None:
                prediction = await anyio.to_thread.run_sync(predict_for_config, state, config)
            elif model is not None:
                settings = {
                    "batch_size": batch_size,
                    "max_seq_length": seq_len,
                    "num_layers": num_layers,
                    "rank": rank,
                    "grad_checkpoint": grad_checkpoint,
                    "chunked_loss": chunked_loss,
                }
                prediction = await anyio.to_thread.run_sync(predict_for_model, state, model, settings)
        own = sample_memory()
        workers = []
        for run_id, pid in state.runner.live_workers().items():
            try:
                rss = psutil.Process(pid).memory_info().rss / 1e9
            except psutil.NoSuchProcess:
                continue
            last = state.runner.memory_samples(run_id, 1)
            sample = last[0] if last else None
            workers.append(
                WorkerMemory(
                    run_id=run_id,
                    pid=pid,
                    rss_gb=rss,
                    mlx_active_gb=sample.active_gb if sample else None,
                    mlx_peak_gb=sample.peak_gb if sample else None,
                    mlx_cache_gb=sample.cache_gb if sample else None,
                    sampled_at=sample.ts if sample else None,
                )
            )
        profile = MemoryProfile(
            prediction=prediction,
            server=ProcessMemory(
                pid=psutil.Process().pid,
                rss_gb=own.rss_gb,
                mlx_active_gb=own.active_gb,
                mlx_peak_gb=own.peak_gb,
                mlx_cache_gb=own.cache_gb,
            ),
            loaded_models=state.models.loaded_models(),
            workers=workers,
            system_total_gb=own.system_total_gb,
            system_available_gb=own.system_available_gb,
        )
        predicted = ""
        if prediction is not None:
            verdict = "fits" if prediction.fits else "does NOT fit"
            predicted = (
                f"predicted peak {prediction.prediction.total_gb:.2f} GB {verdict} the budget of "
                f"{prediction.budget_gb:.2f} GB; "
            )
        summary = predicted + (
            f"server RSS {own.rss_gb:.2f} GB (MLX active {own.active_gb:.2f} GB), {len(profile.loaded_models)} "
            f"model(s) loaded, {len(workers)} live worker(s), system {own.system_available_gb:.1f} of "
            f"{own.system_total_gb:.1f} GB available"
        )
        return tool_result(profile, summary)

    @mcp.tool(
        description=DESCRIPTIONS["start_qlora_run"],
        title="Start QLoRA run",
        annotations=_local(),
    )
    async def start_qlora_run(
        ctx: Context[AppState, Any], config: QLoRAConfig
    ) -> Annotated[CallToolResult, StartedRun]:
        state = _state(ctx)
        raw = config.model_dump(exclude_unset=True)
        raw.setdefault("memory_sample_interval", state.settings.sample_interval)
        with trainer_errors():
            snap = state.runner.submit(raw)
        ahead = len(state.runner.list_runs(JobState.QUEUED, 1000)) - 1 + len(state.runner.live_workers())
        started = StartedRun(
            run_id=snap.id,
            state=snap.state,
            run_dir=snap.run_dir,
            queue_position=max(ahead, 0),
            resources=run_resources(snap.id),
            predicted_peak_gb=snap.metrics.predicted_peak_gb,
            memory_budget_gb=snap.config.get("memory_budget_gb"),
            next_step=f"call run_status with run_id={snap.id!r} and wait_seconds=30 until the state is final",
        )
        predicted = (
            f", predicted peak {snap.metrics.predicted_peak_gb:.2f} GB of a {started.memory_budget_gb:.2f} GB budget"
            if snap.metrics.predicted_peak_gb is not None and started.memory_budget_gb is not None
            else ""
        )
        return tool_result(started, f"run {snap.id} queued ({snap.iters} iterations{predicted}); folder {snap.run_dir}")

    @mcp.tool(
        name="run_status",
        description=DESCRIPTIONS["run_status"],
        title="Run status",
        annotations=_local(read_only=True, idempotent=True),
    )
    async def run_status_tool(
        ctx: Context[AppState, Any],
        run_id: Annotated[str, Field(description="The id start_qlora_run returned.")],
        wait_seconds: Annotated[
            float,
            Field(
                ge=0,
                description="Long-poll: wait up to this long (capped at 60) for the state or iteration "
                "to change, sending progress notifications meanwhile. 0 answers at once.",
            ),
        ] = 0,
        memory_samples: Annotated[int, Field(ge=0, le=200, description="How many latest memory samples.")] = 10,
    ) -> Annotated[CallToolResult, RunStatus]:
        state = _state(ctx)
        with trainer_errors():
            snap = state.runner.get(run_id)
            wait = min(wait_seconds, MAX_WAIT_S)
            if wait > 0 and not snap.state.terminal:
                sent = float(snap.iteration)
                await ctx.report_progress(sent, snap.iters, f"{snap.state.value}, iteration {snap.iteration}")
                snap = await state.runner.wait_for_change(run_id, wait)
                if snap.iteration > sent:  # progress must strictly increase
                    await ctx.report_progress(
                        snap.iteration, snap.iters, f"{snap.state.value}, iteration {snap.iteration}"
                    )
            status = run_status(state, run_id, memory_samples)
        return tool_result(status, summarize_run(status))

    @mcp.tool(
        description=DESCRIPTIONS["cancel_run"],
        title="Cancel run",
        annotations=_local(destructive=True),
    )
    async def cancel_run(
        ctx: Context[AppState, Any], run_id: Annotated[str, Field(description="The run to stop.")]
    ) -> Annotated[CallToolResult, RunStatus]:
        state = _state(ctx)
        with trainer_errors():
            await state.runner.cancel(run_id)
            status = run_status(state, run_id)
        return tool_result(status, summarize_run(status))

    @mcp.tool(
        description=DESCRIPTIONS["list_runs"],
        title="List runs",
        annotations=_local(read_only=True, idempotent=True),
    )
    async def list_runs(
        ctx: Context[AppState, Any],
        state: Annotated[JobState | None, Field(description="Only runs in this state.")] = None,
        limit: Annotated[int, Field(ge=1, le=200, description="Most runs to return, newest first.")] = 20,
    ) -> Annotated[CallToolResult, RunList]:
        app = _state(ctx)
        statuses = [run_status(app, snap.id, 0) for snap in app.runner.list_runs(state, limit)]
        listing = RunList(runs=statuses, total_shown=len(statuses))
        lines = [summarize_run(s) for s in statuses] or ["no runs"]
        return tool_result(listing, f"{len(statuses)} run(s): " + " | ".join(lines))
