"""Around a run over MCP: validate_dataset before it; export_model after it, which fuses a run's adapter into its
base and writes the model as GGUF.

One tool rather than two (the CLI has `fuse` and `export-gguf`): an assistant asked for "a GGUF of my run" makes
one call, and the tool list stays small. The work runs in child processes; this waits in a thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import anyio
from mcp.types import CallToolResult
from pydantic import Field

from trainer import DatasetReport, ExportedModel, export_inputs, export_model, validate_dataset

from .schemas import tool_result
from .tool_support import AppContext, app_state, trainer_errors


async def export_model_tool(
    ctx: AppContext,
    run_id: Annotated[str | None, Field(description="A run: its adapter and base.")] = None,
    model: Annotated[str | None, Field(description="Or a model ...")] = None,
    adapter: Annotated[str | None, Field(description="... and an adapter folder.")] = None,
    gguf: Annotated[
        Literal["f16", "q8_0"] | None,
        Field(description="GGUF (llama.cpp, Ollama, LM Studio): 16 or 8-bit; null: MLX folder only."),
    ] = "f16",
    keep_quantized: Annotated[bool, Field(description="MLX only: re-quantize (smaller, inexact).")] = False,
    out: Annotated[str | None, Field(description="The .gguf file (gguf null: folder) to write.")] = None,
) -> Annotated[CallToolResult, ExportedModel]:
    """Fuse an adapter into its base (an MLX folder) and write GGUF, checked by loading it back. Files go to the run
    folder; none is overwritten."""
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


async def validate_dataset_tool(
    ctx: AppContext,
    data: Annotated[str, Field(description="Folder of train/valid/test.jsonl.")],
    model: Annotated[str | None, Field(description="The run's model (its tokenizer and template).")] = None,
    max_seq_length: Annotated[int, Field(ge=8)] = 2048,
    mask_prompt: bool = False,
) -> Annotated[CallToolResult, DatasetReport]:
    """Check every line before a run (JSON, format, roles, chat template, length): problems by file and line, token
    percentiles, truncation."""
    state = app_state(ctx)
    with trainer_errors():
        report = await anyio.to_thread.run_sync(
            lambda: validate_dataset(
                data, model, max_seq_length=max_seq_length, mask_prompt=mask_prompt,
                models_root=state.models.models_root, paths=state.models.paths,
            )
        )  # fmt: skip
    return tool_result(report, report.summary())
