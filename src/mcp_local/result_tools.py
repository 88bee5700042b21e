"""Around a run over MCP: validate_dataset before it; evaluate and export_model after it (export_model fuses a run's
adapter into its base and writes the model as GGUF).

One tool rather than two (the CLI has `fuse` and `export-gguf`): an assistant asked for "a GGUF of my run" makes
one call, and the tool list stays small. The work runs in child processes; this waits in a thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import anyio
from mcp.types import CallToolResult
from pydantic import Field

from trainer import (
    DatasetReport,
    Evaluation,
    ExportedModel,
    evaluation_spec,
    export_inputs,
    export_model,
    run_evaluation,
    validate_dataset,
)

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
    """Fuse an adapter into its base (an MLX folder), then write GGUF checked by loading it back; never overwrites."""
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
    """Check every line before a run (JSON, format, roles, chat template, length): problems by line, token counts."""
    state = app_state(ctx)
    with trainer_errors():
        report = await anyio.to_thread.run_sync(
            lambda: validate_dataset(
                data, model, max_seq_length=max_seq_length, mask_prompt=mask_prompt,
                models_root=state.models.models_root, paths=state.models.paths,
            )
        )  # fmt: skip
    return tool_result(report, report.summary())


async def evaluate_tool(
    ctx: AppContext,
    run_id: Annotated[str | None, Field(description="A run (its adapter).")] = None,
    model: str | None = None,
    adapter: str | None = None,
    humaneval_limit: Annotated[int, Field(ge=0, le=164)] = 20,
    checker: Annotated[str | None, Field(description="A .py file with score(prompt, reply).")] = None,
) -> Annotated[CallToolResult, Evaluation]:
    """Base vs adapter: HumanEval pass@1 (sandboxed), test.jsonl loss, a checker's score; kept with the run."""
    state = app_state(ctx)
    with trainer_errors():
        spec, folder = evaluation_spec(
            state.runner.store, run_id=run_id, model=model, adapter=adapter, data=None,
            models_root=state.models.models_root, paths=state.models.paths, humaneval_limit=humaneval_limit,
            checker=checker,
        )  # fmt: skip
        total = humaneval_limit * (2 if spec.adapter else 1)
        done = 0

        def progress(line: str) -> None:
            nonlocal done
            done += 1
            anyio.from_thread.run(ctx.report_progress, float(done), float(max(total, done)), line)

        evaluation = await anyio.to_thread.run_sync(lambda: run_evaluation(spec, folder, progress))
    # per-problem outcomes stay in the run's evaluation.json: the answer carries the scores
    brief = evaluation.model_copy(
        update={"scores": [s.model_copy(update={"humaneval_problems": []}) for s in evaluation.scores]}
    )
    return tool_result(brief, evaluation.summary())
