"""The speed users get, side by side in one run: a real QLoRA run through the MCP server over stdio, against the
in-process step benchmark of the same settings, and against plain `mlx_lm lora` (the CLI, as installed) on the same
model and data.

uv run python bench/product.py [--model M] [--data D] [--iters 40] [--plain-iters 4] [--out results.jsonl]

Rows: `product` (start_qlora_run, followed with run_status to the end: training-phase tokens/s from the run's own
reports after the first (compiling) window, its MLX peak over the whole run, the predicted peak, wall time from the
call to the adapter), `step` (the worker's model and loss, compiled steps timed in this process, no evaluation,
reporting or sampling) and `plain`
(`python -m mlx_lm lora` on the imported model folder, tokens/s from its own reports, without our preloads).
Defaults: the bundled SmolLM2-135M-Instruct and the house-style dataset, batch 4, max_seq_length 256, rank 16.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from memory_prediction import report

from mcp import Client, StdioServerParameters
from mcp_local_demo.bundled import house_style_data, smollm2_gguf
from trainer import QLoRAConfig, RunDefaults, prepare_run

BATCH, SEQ = 4, 256


def run_config(model: str, data: str, iters: int, processes: int = 1) -> dict[str, Any]:
    return {
        "num_processes": processes,
        "model": model,
        "data": data,
        "iters": iters,
        "batch_size": BATCH,
        "max_seq_length": SEQ,
        "learning_rate": 2e-4,
        "mask_prompt": True,
        "steps_per_report": 5,
        "steps_per_eval": iters,
        "val_batches": 4,
        "save_every": iters,
    }


async def product(model: str, data: str, iters: int, home: Path, processes: int = 1) -> dict[str, Any]:
    roots = [arg for folder in (Path(data), Path(model).parent) for arg in ("--root", str(folder))]
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_local", "--home", str(home), "--log-level", "WARNING", *roots],
        env=dict(os.environ),
    )
    async with Client(params, mode="legacy") as client:
        started_at = time.perf_counter()
        config = run_config(model, data, iters, processes)
        started = await client.call_tool("start_qlora_run", {"config": config})
        assert not started.is_error, started.content
        run_id = started.structured_content["run_id"]
        while True:
            result = await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 30})
            status = result.structured_content
            if status["state"] in ("succeeded", "failed", "cancelled"):
                break
        wall = time.perf_counter() - started_at
        assert status["state"] == "succeeded", status["error"]
        metrics = json.loads((await client.read_resource(f"runs://{run_id}/metrics")).contents[0].text)
    reports = metrics["train"]
    # the first report window holds the compilation, which the step benchmark's warm-up steps leave out too
    steady = list(zip(reports[1:], reports, strict=False))
    tokens = sum(r["trained_tokens"] - p["trained_tokens"] for r, p in steady)
    seconds = sum((r["trained_tokens"] - p["trained_tokens"]) / r["tokens_per_second"] for r, p in steady)
    return {
        "who": "product: start_qlora_run over MCP stdio" + (f", {processes} processes" if processes > 1 else ""),
        "tok_s": tokens / seconds,
        "peak_gb": status["metrics"]["peak_memory_gb"],
        "rank_peaks_gb": status["metrics"].get("rank_peak_memory_gb"),
        "losses": [r["train_loss"] for r in reports],
        "predicted_gb": status["metrics"]["predicted_peak_gb"],
        "wall_s": wall,
        "iters": iters,
    }


STEP_CHILD = r"""
import json, sys, time, types
from pathlib import Path
import mlx.core as mx, mlx.optimizers as optim, numpy as np
import mlx.nn as nn
from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
from mlx_lm.tuner.trainer import iterate_batches
from trainer import QLoRAConfig
from trainer.engine.losses import training_loss
from trainer.engine.mlx_backend import _add_lora, load_for_training
from trainer.engine.patches import fast_activations
from trainer.planning.device import fast_path_on
config = QLoRAConfig.model_validate_json(sys.argv[1]); steps = int(sys.argv[2])
mx.random.seed(config.seed); np.random.seed(config.seed)
model, tokenizer, _ = load_for_training(config)
train, _, _ = load_local_dataset(Path(config.data), tokenizer, types.SimpleNamespace(mask_prompt=config.mask_prompt))
_add_lora(config, model)
optimizer = optim.Adam(learning_rate=config.learning_rate)
loss_and_grad = nn.value_and_grad(model, training_loss(fast_path_on(config.fast_path), config.chunked_loss))
state = [model.state, optimizer.state, mx.random.state]
def step(batch):
    (loss, toks), grads = loss_and_grad(model, *batch)
    optimizer.update(model, grads)
    return loss, toks
step = mx.compile(step, inputs=state, outputs=state)
batches = iterate_batches(CacheDataset(train), config.batch_size, config.max_seq_length, loop=True)
with fast_activations(model):
    model.train()
    for _ in range(3):
        loss, toks = step(next(batches)); mx.eval(state, loss, toks)
    mx.reset_peak_memory()
    tokens, start = 0, time.perf_counter()
    for _ in range(steps):
        loss, toks = step(next(batches)); mx.eval(state, loss, toks); tokens += toks.item()
    seconds = time.perf_counter() - start
print(json.dumps({"tok_s": tokens / seconds, "peak_gb": mx.get_peak_memory() / 1e9}))
"""


def step_benchmark(model: str, data: str, steps: int, home: Path) -> dict[str, Any]:
    """The worker's own model, LoRA, loss and patches, as `prepare_run` configures them, timed step by step."""
    from trainer.environment.process_env import worker_environment

    prepared = prepare_run(QLoRAConfig.parse(run_config(model, data, steps)), RunDefaults.for_home(home))
    out = subprocess.run(
        [sys.executable, "-c", STEP_CHILD, prepared.config.model_dump_json(), str(steps)],
        capture_output=True,
        text=True,
        env=worker_environment({}, home),
        check=True,
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {"who": "step benchmark (in-process, same settings)", **row, "iters": steps}


def plain_cli(model_dir: str, data: str, iters: int, work: Path) -> dict[str, Any]:
    """`mlx_lm lora` as a user would run it: no preloads, MLX-LM's own defaults beyond the shared settings."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"NO_COLOR": "1", "TERM": "dumb"}
    # the CLI has no rank flag: the reference LoRA (rank 16, alpha 32) comes in through its YAML config
    (work / "lora.yaml").write_text("lora_parameters:\n  rank: 16\n  scale: 2.0\n  dropout: 0.0\n", encoding="utf-8")
    command = [
        sys.executable, "-m", "mlx_lm", "lora", "--model", model_dir, "--train", "--data", data,
        "--iters", str(iters), "--batch-size", str(BATCH), "--max-seq-length", str(SEQ), "--num-layers", "16",
        "--learning-rate", "2e-4", "--mask-prompt", "--steps-per-report", "1", "--steps-per-eval", "100000",
        "--val-batches", "1", "--adapter-path", str(work / "plain-adapters"), "-c", str(work / "lora.yaml"),
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True, cwd=work)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)
    # its report lines: iteration, loss and arrow, tokens/s (whole numbers), trained thousands of tokens
    rates = [float(m.replace(",", "")) for m in re.findall(r"^\s*\d+\s+[0-9.]+ [▼▲]\s+([0-9,]+)\s", text, re.M)]
    if not rates:
        raise RuntimeError(f"no training reports in mlx_lm's output:\n{out.stdout[-2000:]}")
    later = rates[1:] or rates  # the first step includes compiling
    row = {"who": "plain mlx_lm lora (CLI, as installed)", "tok_s": sum(later) / len(later), "iters": iters}
    return {**row, "note": "tokens/s as the CLI prints them: whole numbers"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(smollm2_gguf()))
    parser.add_argument("--data", default=str(house_style_data()))
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--plain-iters", type=int, default=3, help="plain MLX-LM's CPU training is slow: fewer")
    parser.add_argument("--out", default=None)
    parser.add_argument("--processes", type=int, default=1, help="also the product with N ring processes, same batch")
    parser.add_argument("--skip-peers", action="store_true", help="no step benchmark or plain MLX-LM rows")
    args = parser.parse_args()
    machine = {"cpu": _cpu_model(), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        first = anyio.run(product, args.model, args.data, args.iters, home)
        report({**machine, **first}, args.out)
        if args.processes > 1:
            group = anyio.run(product, args.model, args.data, args.iters, Path(tmp) / "home-group", args.processes)
            diff = max(abs(a - b) for a, b in zip(first["losses"], group["losses"], strict=True))
            report(
                {**machine, **group, "over_one_process": group["tok_s"] / first["tok_s"], "max_loss_diff": diff},
                args.out,
            )
        if args.skip_peers:
            return
        for measure in (
            lambda: step_benchmark(args.model, args.data, args.iters, home),
            lambda: plain_cli(_model_dir(args, home), args.data, args.plain_iters, Path(tmp)),
        ):
            row = measure()
            report({**machine, **row, "product_over_this": first["tok_s"] / row["tok_s"]}, args.out)


def _model_dir(args: argparse.Namespace, home: Path) -> str:
    """The model folder the product trained (a GGUF's import), for the CLI."""
    return prepare_run(QLoRAConfig.parse(run_config(args.model, args.data, 1)), RunDefaults.for_home(home)).config.model


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
