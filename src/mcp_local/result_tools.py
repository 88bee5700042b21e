"""From a run to a result over MCP: one tool fuses a run's adapter into its base and writes the model as GGUF.

One tool rather than two (the CLI has `fuse` and `export-gguf`): an assistant asked for "a GGUF of my run" makes
one call, and the tool list stays small. The work runs in child processes; this waits in a thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import anyio
from mcp.types import CallToolResult
from pydantic import Field

from trainer import ExportedModel, export_inputs, export_model

from .schemas import tool_result
from .tool_support import AppContext, app_state, trainer_errors


async def export_model_tool(
    ctx: AppContext,
    run_id: Annotated[str | None, Field(description="A run: its adapter and base.")] = None,
    model: Annotated[str | None, Field(description="Or a model ...")] = None,
    adapter: Annotated[str | None, Field(description="... and an adapter folder.")] = None,
    gguf: Annotated[
        Literal["f16", "q8_0"] | None,
        Field(description="GGUF for llama.cpp, Ollama, LM Studio: 16-bit or 8-bit; null: the MLX folder only."),
    ] = "f16",
    keep_quantized: Annotated[bool, Field(description="MLX only: re-quantize (smaller, inexact).")] = False,
    out: Annotated[str | None, Field(description="The .gguf file (gguf null: folder) to write.")] = None,
) -> Annotated[CallToolResult, ExportedModel]:
    """Fuse an adapter into its base (an MLX model folder) and write it as GGUF, checked by loading it back (32 greedy
    tokens). Files go to the run folder; nothing is overwritten."""
    state = app_state(ctx)
    with trainer_errors():
        paths = state.models.paths
        inputs = export_inputs(
            state.runner.store, run_id=run_id, model=model, adapter=adapter, models_root=state.models.models_root,
            paths=paths,
        )  # fmt: skip
        target = paths.check(Path(out), "out") if out else None
        exported = await anyio.to_thread.run_sync(
            lambda: export_model(inputs, gguf_type=gguf, keep_quantized=keep_quantized, out=target)
        )
    return tool_result(exported, exported.summary())
