"""The tools: thin adapters from MCP arguments to the trainer's API, each returning a summary line plus typed JSON.

Each tool is a module-level function (importable and testable on its own); `register_tools` adds them to a server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field

from trainer import (
    Generation,
    ModelInfo,
    QLoRAConfig,
    RunPrediction,
    hub_cached_models,
    imported_models,
    predict_model,
    predict_run,
    process_memory,
    sample_memory,
)

from .result_tools import build_dataset_tool, evaluate_tool, export_model_tool, validate_dataset_tool
from .run_tools import cancel_run, delete_run, list_runs, resume_run, run_status_tool, start_qlora_run
from .schemas import MemoryProfile, ModelList, tool_result
from .state import AppState
from .tool_support import AppContext, app_state, local_hints, trainer_errors


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


async def load_model(
    ctx: AppContext,
    path: Annotated[str, Field(description="Model folder, .gguf file or hub repo id.")],
    adapter: Annotated[str | None, Field(description="Adapter folder (a run's adapter_path).")] = None,
) -> Annotated[CallToolResult, ModelInfo]:
    """Keep a model (and adapter) loaded for generate."""
    state = app_state(ctx)
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
    prompt: Annotated[str | None, Field(description="A user message.")] = None,
    messages: Annotated[list[ChatMessage] | None, Field(description="A chat instead of a prompt.")] = None,
    max_tokens: Annotated[int, Field(ge=1, le=8192, description="Most tokens to generate.")] = 256,
    temperature: Annotated[float, Field(ge=0, le=2, description="0 is greedy.")] = 0.0,
    top_p: Annotated[float, Field(gt=0, le=1, description="Nucleus sampling.")] = 1.0,
    seed: Annotated[int | None, Field(description="For sampling; repeats a reply.")] = None,
    adapter: Annotated[str | None, Field(description="An adapter folder.")] = None,
    run_id: Annotated[str | None, Field(description="A run's model and adapter.")] = None,
) -> Annotated[CallToolResult, Generation]:
    """A reply from the loaded model, an adapter or a run's adapter."""
    state = app_state(ctx)
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


async def _prediction(state: AppState, config: dict[str, Any] | None, model: str | None) -> RunPrediction | None:
    defaults = state.settings.run_defaults()
    if config is None and model is not None:
        config = {"model": model}
    if config is None:
        return None
    if "data" in config:
        parsed = QLoRAConfig.parse(config)
        return await anyio.to_thread.run_sync(predict_run, parsed, defaults)
    settings = {k: v for k, v in config.items() if k != "model"}
    if "model" not in config:
        raise ToolError('config needs a model: {"model": "<folder, .gguf or repo id>", ...}')
    return await anyio.to_thread.run_sync(predict_model, str(config["model"]), settings, defaults)


async def profile_memory(
    ctx: AppContext,
    config: Annotated[
        dict[str, Any] | None,
        Field(description="A start_qlora_run config (data optional)."),
    ] = None,
    model: Annotated[str | None, Field(description="Or a model, with default settings.")] = None,
) -> Annotated[CallToolResult, MemoryProfile]:
    """Memory in use; for a config or model, its predicted peak vs budget."""
    state = app_state(ctx)
    with trainer_errors():
        prediction = await _prediction(state, config, model)
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
        processes = prediction.num_processes
        each = f" per process (each of {processes})" if processes > 1 else ""
        predicted = (
            f"predicted peak {prediction.prediction.total_gb:.2f} GB{each} {verdict} the budget of "
            f"{prediction.budget_gb:.2f} GB; "
        )
        if prediction.choice and not prediction.fits:
            predicted += f"fit_to_budget would take {prediction.choice}; "
    summary = predicted + (
        f"server RSS {profile.server.rss_gb:.2f} GB (MLX active {profile.server.mlx_active_gb or 0:.2f} GB), "
        f"{len(profile.loaded_models)} model(s) loaded, {len(profile.workers)} live worker(s), system "
        f"{system.system_available_gb:.1f} of {system.system_total_gb:.1f} GB available"
    )
    return tool_result(profile, summary)


async def list_models(ctx: AppContext) -> Annotated[CallToolResult, ModelList]:
    """Models loaded, imported from GGUF and in the Hugging Face cache."""
    state = app_state(ctx)
    models_root = state.settings.models_root()
    imported = await anyio.to_thread.run_sync(imported_models, models_root)
    cached = await anyio.to_thread.run_sync(hub_cached_models)
    listing = ModelList(loaded=state.models.loaded_models(), imported=imported, hub_cache=cached)
    total = sum(m.size_gb for m in [*imported, *cached])
    summary = (
        f"{len(listing.loaded)} loaded, {len(imported)} imported (under {models_root}), {len(cached)} in the hub "
        f"cache; {total:.2f} GB on disk"
    )
    return tool_result(listing, summary)


Tool = Callable[..., Awaitable[CallToolResult]]
#: display titles, for hosts that list tools to people (short: every byte of tools/list is in every conversation)
TITLES = {
    "load_model": "Load a model",
    "generate": "Generate text",
    "profile_memory": "Profile memory",
    "start_qlora_run": "Start a QLoRA run",
    "run_status": "Follow a run",
    "cancel_run": "Cancel a run",
    "resume_run": "Resume a run",
    "list_runs": "List runs",
    "delete_run": "Delete a run",
    "list_models": "List models",
    "build_dataset": "Build a dataset from a repo",
    "validate_dataset": "Validate a dataset",
    "evaluate": "Evaluate base vs adapter",
    "export_model": "Fuse and export to GGUF",
}
TOOLS: dict[str, tuple[Tool, ToolAnnotations]] = {
    "load_model": (load_model, local_hints(idempotent=True, downloads=True)),
    "generate": (generate, local_hints(read_only=True, downloads=True)),
    "profile_memory": (profile_memory, local_hints(read_only=True, downloads=True)),
    "start_qlora_run": (start_qlora_run, local_hints(downloads=True)),
    "run_status": (run_status_tool, local_hints(read_only=True, idempotent=True)),
    "cancel_run": (cancel_run, local_hints(destructive=True)),
    "resume_run": (resume_run, local_hints()),
    "list_runs": (list_runs, local_hints(read_only=True, idempotent=True)),
    "delete_run": (delete_run, local_hints(destructive=True, idempotent=True)),
    "list_models": (list_models, local_hints(read_only=True, idempotent=True)),
    "build_dataset": (build_dataset_tool, local_hints(downloads=True)),
    "validate_dataset": (validate_dataset_tool, local_hints(read_only=True, idempotent=True, downloads=True)),
    "evaluate": (evaluate_tool, local_hints(downloads=True)),  # writes evaluation.json into the run folder
    "export_model": (export_model_tool, local_hints(downloads=True)),
}


def description(tool: Tool) -> str:
    """A tool's description is its docstring, on one line."""
    return " ".join((tool.__doc__ or "").split())


def register_tools(mcp: MCPServer[Any]) -> None:
    for name, (tool, hints) in TOOLS.items():
        mcp.tool(name=name, title=TITLES[name], description=description(tool), annotations=hints)(tool)
