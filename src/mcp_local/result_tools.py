"""Around a run over MCP: build_dataset and validate_dataset before it; evaluate and export_model after it
(export_model fuses a run's adapter into its base and writes the model as GGUF).

One tool rather than two (the CLI has `fuse` and `export-gguf`): an assistant asked for "a GGUF of my run" makes
one call, and the tool list stays small. The work runs in child processes; this waits in a thread.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

import anyio
from mcp.types import CallToolResult
from pydantic import Field

from trainer import (
    BuildReport,
    DatasetReport,
    EvaluationState,
    ExportedModel,
    build_dataset,
    evaluation_spec,
    evaluation_state,
    export_inputs,
    export_model,
    start_evaluation,
    validate_dataset,
)

from .schemas import tool_result
from .tool_support import AppContext, app_state, progress_from_thread, trainer_errors

#: seconds between looks at a background evaluation's folder
POLL_S = 0.5
#: how long one evaluate call follows the evaluation (under the hosts' 60-120 s call limits)
EVALUATE_WAIT_S = 50.0


async def export_model_tool(
    ctx: AppContext,
    run_id: Annotated[str | None, Field(description="A run: its adapter and base.")] = None,
    model: Annotated[str | None, Field(description="Or a model ...")] = None,
    adapter: Annotated[str | None, Field(description="... and an adapter folder.")] = None,
    gguf: Annotated[
        Literal["f16", "q8_0"] | None,
        Field(description="16 or 8-bit GGUF (llama.cpp, Ollama); null: MLX folder only."),
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


async def build_dataset_tool(
    ctx: AppContext,
    source: Annotated[str, Field(description="A repository folder.")],
    out: Annotated[str, Field(description="A new folder.")],
    format: Annotated[
        Literal["completion", "fim", "instruct"],
        Field(description="Code chunks; fill-in-the-middle; Python docstring -> body."),
    ] = "completion",
    model: Annotated[str | None, Field(description="Counts tokens; fim needs it.")] = None,
    max_seq_length: Annotated[int, Field(ge=64, le=32768, description="Chunk tokens.")] = 2048,
    seed: Annotated[int, Field(ge=0, description="Picks held-out files.")] = 0,
    held_out: Annotated[float, Field(gt=0, le=0.4, description="Share in valid, and in test.")] = 0.1,
) -> Annotated[CallToolResult, BuildReport]:
    """Repo -> train/valid/test.jsonl, split by file, .gitignore'd, secret and generated files left out; a report."""
    state = app_state(ctx)
    with trainer_errors():
        paths = state.models.paths
        report = await anyio.to_thread.run_sync(
            lambda: build_dataset(
                source, out, fmt=format, model=model, models_root=state.models.models_root,
                max_seq_length=max_seq_length, seed=seed, held_out=held_out, paths=paths,
                progress=progress_from_thread(ctx, "reading the repository"),
            )
        )  # fmt: skip
    return tool_result(report, report.summary())


async def validate_dataset_tool(
    ctx: AppContext,
    data: Annotated[str, Field(description="Folder of train/valid/test.jsonl.")],
    model: Annotated[str | None, Field(description="The run's model (its tokenizer and template).")] = None,
    max_seq_length: Annotated[int, Field(ge=8, description="The run's; longer lines are cut.")] = 2048,
    mask_prompt: Annotated[bool, Field(description="Count completion tokens only.")] = False,
) -> Annotated[CallToolResult, DatasetReport]:
    """Check every line before a run (JSON, format, roles, template, length): problems by line, token counts."""
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
    model: Annotated[str | None, Field(description="Or a model, instead of a run.")] = None,
    adapter: Annotated[str | None, Field(description="With model: its adapter.")] = None,
    data: Annotated[str | None, Field(description="Its test.jsonl is held out; default: the run's.")] = None,
    humaneval_limit: Annotated[int, Field(ge=0, le=164, description="HumanEval problems.")] = 20,
    completion_limit: Annotated[int, Field(ge=0, le=2000, description="Held-out functions written.")] = 50,
    test_command: Annotated[str | None, Field(description="Repo tests, run per body.")] = None,
    checker: Annotated[str | None, Field(description="A .py file with score(prompt, reply).")] = None,
) -> Annotated[CallToolResult, EvaluationState]:
    """Base vs adapter in the background: held-out loss, perplexity and (instruct data) function completion with 95%
    intervals, HumanEval pass@1, a checker. Waits 50 s; call again to follow."""
    state = app_state(ctx)
    with trainer_errors():
        spec, folder = evaluation_spec(
            state.runner.store, run_id=run_id, model=model, adapter=adapter, data=data,
            models_root=state.models.models_root, paths=state.models.paths, humaneval_limit=humaneval_limit,
            checker=checker, completion_limit=completion_limit, test_command=test_command,
        )  # fmt: skip
        folder = (
            folder
            or state.settings.home / "evaluations" / hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:12]
        )
        current = evaluation_state(folder)
        same_finished = current is not None and current.evaluation is not None and current.evaluation.spec == spec
        if current is None or (current.state != "running" and not same_finished):
            current = start_evaluation(spec, folder)  # else: follow the running one, or answer the finished one
        current = await _follow_evaluation(ctx, folder, current, EVALUATE_WAIT_S)
    return tool_result(_brief(current), current.summary())


async def _follow_evaluation(ctx: AppContext, folder: Path, current: EvaluationState, wait: float) -> EvaluationState:
    """Poll the evaluation's folder until it ends or `wait` passes, with a progress notification per problem."""
    sent = -1
    with anyio.move_on_after(wait):
        while current.state == "running":
            if current.done > sent:
                sent = current.done
                await ctx.report_progress(float(sent), float(max(current.total, sent)), current.summary())
            await anyio.sleep(POLL_S)
            current = evaluation_state(folder) or current
    return current


def _brief(current: EvaluationState) -> EvaluationState:
    """Per-problem, per-file and per-function results stay in evaluation.json; the answer carries the figures."""
    if current.evaluation is None:
        return current
    scores = [
        s.model_copy(
            update={
                "humaneval_problems": [],
                "held_out": s.held_out.model_copy(update={"units": []}) if s.held_out else None,
                "completion": s.completion.model_copy(update={"results": []}) if s.completion else None,
            }
        )
        for s in current.evaluation.scores
    ]
    return current.model_copy(update={"evaluation": current.evaluation.model_copy(update={"scores": scores})})
