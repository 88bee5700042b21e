"""The main job end to end, as an MCP host would run it: `scripts/demo` (or `python -m mcp_local_demo`).

Starts `mcp-local` as a subprocess, drives it over stdio with the SDK's client (2025 handshake, like Claude
Desktop): load the model, generate before training, profile memory, start a QLoRA run on the dataset, follow it with
run_status, generate after training with the adapter, and print base vs tuned side by side with the house-style
checker's score for each.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from mcp.types import BlobResourceContents
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mcp import Client, StdioServerParameters
from trainer import reexec_with_preloads

from .bundled import house_style_data, smollm2_gguf
from .house_style import load_heldout, score_reply

#: in a log, `tee` or CI (no terminal): whole lines, never cut at 80 columns
console = Console(highlight=False, soft_wrap=not sys.stdout.isatty())
TERMINAL = ("succeeded", "failed", "cancelled")


class DemoError(Exception):
    pass


def structured(result: Any, what: str) -> dict[str, Any]:
    if result.is_error:
        raise DemoError(f"{what} failed: {result.content[0].text}")
    return dict(result.structured_content)


def _summary(result: Any) -> str:
    return str(result.content[0].text.split("\n", 1)[0])


async def _generate_all(client: Client, prompts: list[Any], max_tokens: int, run_id: str | None) -> list[str]:
    replies = []
    for item in prompts:
        args: dict[str, Any] = {"prompt": item.prompt, "max_tokens": max_tokens}
        if run_id:
            args["run_id"] = run_id
        replies.append(str(structured(await client.call_tool("generate", args), "generate")["text"]))
    return replies


async def follow_run(client: Client, run_id: str, iters: int) -> dict[str, Any]:
    columns = (
        TextColumn("[bold]training[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=iters, info="starting the worker")

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            bar.update(task, completed=min(progress, iters))

        while True:
            result = await client.call_tool(
                "run_status", {"run_id": run_id, "wait_seconds": 15, "memory_samples": 1}, progress_callback=on_progress
            )
            status = structured(result, "run_status")
            m = status["metrics"]
            memory = status["recent_memory"][-1] if status["recent_memory"] else None
            info = " ".join(
                part
                for part in (
                    status["phase"] or status["state"],
                    f"loss {m['last_train_loss']:.3f}" if m["last_train_loss"] is not None else "",
                    f"val {m['last_val_loss']:.3f}" if m["last_val_loss"] is not None else "",
                    f"{m['average_tokens_per_second']:.0f} tok/s average" if m.get("average_tokens_per_second") else "",
                    f"worker RSS {memory['rss_gb']:.2f} GB, MLX peak {memory['mlx_peak_gb']:.2f} GB" if memory else "",
                )
                if part
            )
            bar.update(task, completed=status["iteration"], info=info)
            if not console.is_terminal:  # no live bar there: a line per answer (about every 15 s) shows progress
                console.print(f"training {status['iteration']}/{iters} {info}")
            if status["state"] in TERMINAL:
                return status


async def _humaneval_before_after(client: Client, run_id: str, problems: int) -> dict[str, float | None]:
    """Does the style come at the cost of working code? HumanEval's first problems, base then tuned, sandboxed."""
    passed: dict[str, float | None] = {"base": None, "adapter": None}
    if not problems:
        return passed
    console.rule(f"HumanEval pass@1, first {problems} problems (base, then tuned)")
    while True:  # evaluate answers within 50 s; a slower machine calls again to follow it
        state = structured(
            await client.call_tool("evaluate", {"run_id": run_id, "humaneval_limit": problems}), "evaluate"
        )
        console.print(f"  {state['done']} of {state['total']} done")
        if state["state"] != "running":
            break
    if state["state"] != "succeeded":
        raise DemoError(f"the evaluation failed: {state['error']}")
    return passed | {s["name"]: s["humaneval_pass_at_1"] for s in state["evaluation"]["scores"]}


def _print_where(summary: dict[str, Any], run_dir: Path, home: Path) -> None:
    console.print(
        f"\nwall time {summary['wall_seconds']} s\nrun folder  {run_dir}\nadapter     {summary['adapter']}\n"
        f"plot        {run_dir / 'plot.png'}\nworker log  {run_dir / 'worker.log'}\n"
        f"events      {run_dir / 'events.jsonl'}\ndatabase    {home / 'runs.sqlite3'}"
    )


def _print_pass_at_1(problems: int, passed: dict[str, float | None], base_style: float, tuned_style: float) -> None:
    if problems and passed["base"] is not None and passed["adapter"] is not None:
        console.print(
            f"HumanEval pass@1 on {problems} problems: base {passed['base']:.2f}, tuned {passed['adapter']:.2f} "
            f"(house style: base {base_style:.2f}, tuned {tuned_style:.2f})"
        )


def _side_by_side(prompts: list[Any], base: list[str], tuned: list[str]) -> tuple[float, float]:
    table = Table(title="base vs tuned (house style: code block only, type hints, one-line docstring)")
    table.add_column("prompt", max_width=28)
    table.add_column("base model", max_width=48)
    table.add_column("score", justify="right")
    table.add_column("fine-tuned", max_width=48)
    table.add_column("score", justify="right")
    base_scores, tuned_scores = [], []
    for item, b, t in zip(prompts, base, tuned, strict=True):
        sb, st = score_reply(b, item.function).score, score_reply(t, item.function).score
        base_scores.append(sb)
        tuned_scores.append(st)
        table.add_row(item.prompt, b.strip()[:400], f"{sb:.2f}", t.strip()[:400], f"{st:.2f}")
    base_mean, tuned_mean = sum(base_scores) / len(base_scores), sum(tuned_scores) / len(tuned_scores)
    table.add_row("[bold]mean", "", f"[bold]{base_mean:.2f}", "", f"[bold]{tuned_mean:.2f}")
    console.print(table)
    return base_mean, tuned_mean


def _roots(args: argparse.Namespace) -> list[Path]:
    """The folders the server may read: the model's (a folder, or a .gguf file's folder) and the data's."""
    model = Path(args.model).expanduser()
    found = [args.data, model if model.is_dir() else model.parent] if model.exists() else [args.data]
    return [Path(folder).resolve() for folder in found]


async def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    home = args.home.resolve()
    prompts = load_heldout(args.data)[: args.eval_prompts]
    env = dict(os.environ)
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_local", "--home", str(home), "--sample-interval", "0.5", "--log-level", "WARNING"]
        + [arg for folder in _roots(args) for arg in ("--root", str(folder))],
        env=env,
    )
    console.rule("[bold]mcp-local demo")
    console.print(f"model: {args.model}\ndata: {args.data}\nruns folder: {home}")
    async with Client(params, mode="legacy") as client:
        console.print(
            f"connected to {client.server_info.name if client.server_info else 'server'} "
            f"(protocol {client.protocol_version})"
        )
        loaded = await client.call_tool("load_model", {"path": args.model})
        structured(loaded, "load_model")
        console.print(_summary(loaded))

        console.rule("before training")
        base = await _generate_all(client, prompts, args.max_tokens, None)
        console.print(f"generated {len(base)} base replies")
        console.print(_summary(await client.call_tool("profile_memory", {})))

        config = {
            "model": args.model,
            "data": str(args.data),
            "iters": args.iters,
            "batch_size": 4,
            "learning_rate": 2e-4,
            "mask_prompt": True,
            "max_seq_length": 256,
            "steps_per_report": 5,
            "steps_per_eval": max(args.iters // 2, 1),
            "val_batches": 4,
            "save_every": args.iters,
        }
        console.rule("QLoRA fine-tuning (rank 16, alpha 32, 4-bit base)")
        started_run = structured(await client.call_tool("start_qlora_run", {"config": config}), "start_qlora_run")
        run_id = started_run["run_id"]
        console.print(f"run {run_id} queued; folder {started_run['run_dir']}")
        status = await follow_run(client, run_id, args.iters)
        if status["state"] != "succeeded":
            raise DemoError(f"run {run_id} ended {status['state']}: {status['error']}")
        m = status["metrics"]
        console.print(
            f"validation loss {m['first_val_loss']:.3f} -> {m['last_val_loss']:.3f}, "
            f"{m['average_tokens_per_second'] or 0:.0f} tokens/s on average "
            f"({m['tokens_per_second'] or 0:.0f} in the last window), peak {m['peak_memory_gb']:.2f} GB"
        )
        console.rule("after training")
        tuned = await _generate_all(client, prompts, args.max_tokens, run_id)
        plot = (await client.read_resource(f"runs://{run_id}/plot")).contents[0]
        passed = await _humaneval_before_after(client, run_id, args.humaneval)
    base_mean, tuned_mean = _side_by_side(prompts, base, tuned)
    _print_pass_at_1(args.humaneval, passed, base_mean, tuned_mean)
    run_dir = Path(status["run_dir"])
    if isinstance(plot, BlobResourceContents):  # loss and memory over the run, next to it
        (run_dir / "plot.png").write_bytes(base64.b64decode(plot.blob))
    summary = {
        "run_id": run_id,
        "wall_seconds": round(time.monotonic() - started, 1),
        "first_val_loss": m["first_val_loss"],
        "last_val_loss": m["last_val_loss"],
        "tokens_per_second": m["average_tokens_per_second"],
        "last_window_tokens_per_second": m["tokens_per_second"],
        "peak_memory_gb": m["peak_memory_gb"],
        "base_score": base_mean,
        "tuned_score": tuned_mean,
        "base_pass_at_1": passed["base"],
        "tuned_pass_at_1": passed["adapter"],
        "run_dir": str(run_dir),
        "adapter": status["adapter_path"],
    }
    _print_where(summary, run_dir, home)
    return summary


def main(argv: list[str] | None = None) -> int:
    reexec_with_preloads()
    parser = argparse.ArgumentParser(prog="python -m mcp_local_demo", description=__doc__)
    parser.add_argument("--model", default=None, help="repo id, model folder or .gguf (default: bundled SmolLM2)")
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (default: bundled house style)")
    parser.add_argument("--iters", type=int, default=None, help="training steps (default: 40; 30 with --repo)")
    parser.add_argument("--eval-prompts", type=int, default=6, help="held-out prompts scored before and after")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--humaneval", type=int, default=5, help="HumanEval problems scored before and after (0: none)")
    parser.add_argument("--home", type=Path, default=Path("demo-output"), help="runs folder (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    parser.add_argument("--repo", action="store_true", help="the second scenario: tune on toolz's code from PyPI")
    args = parser.parse_args(argv)
    args.model = args.model or str(smollm2_gguf())
    if args.repo:
        from .repo_demo import prepare, run_repo_demo

        args.iters = args.iters or 30
        summary = _run(args, run_repo_demo, prepare)
        return 0 if summary is not None else 1
    args.iters = args.iters or 40
    args.data = (args.data or house_style_data()).resolve()
    summary = _run(args, run_demo)
    return 0 if summary is not None and summary["tuned_score"] > summary["base_score"] else 1


def _run(
    args: argparse.Namespace,
    scenario: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]],
    prepare: Callable[[argparse.Namespace], None] | None = None,
) -> dict[str, Any] | None:
    """One scenario: its summary (also written to --json), or None after saying why it failed."""
    try:
        if prepare is not None:
            prepare(args)
        summary = anyio.run(scenario, args)
    except DemoError as exc:
        console.print(f"[red]demo failed: {exc}")
        return None
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


if __name__ == "__main__":
    sys.exit(main())
