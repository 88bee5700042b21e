"""Where the run path loses time against the step benchmark (for finding causes; the product numbers come from
gpu_product.py): the same 7B-shaped 4-bit QLoRA step run as a product run with variations, and in-process through
our training loop with the worker's model loading and data, each step timed.

python3 bench/gpu_run_path.py --work DIR [--size 1x2048] [--iters 20] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from gpu_product import _lora_layers, build_data, build_model, product  # noqa: E402
from memory_prediction import report  # noqa: E402

IN_PROCESS = r"""
import json, statistics, sys, time, types
from pathlib import Path
import mlx.core as mx
import mlx.optimizers as optim
from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
from trainer.engine.batches import training_batches
from trainer.engine.loop import fused_step
from trainer.engine.losses import training_loss
from trainer.engine.mlx_backend import _add_lora, load_for_training
from trainer.planning.config import QLoRAConfig

cfg = json.loads(sys.argv[1])
import os
os.environ["MCP_LOCAL_INPUT_ALIGN"] = str(cfg["align"])
config = QLoRAConfig.model_validate(cfg["config"])
mx.random.seed(0)
model, tokenizer, _ = load_for_training(config)
train_set, _, _ = load_local_dataset(Path(config.data), tokenizer, types.SimpleNamespace(mask_prompt=False))
_add_lora(config, model)
optimizer = optim.Adam(learning_rate=config.learning_rate)
step = fused_step(model, optimizer, training_loss(True, False))
model.train()
times, fetch, counted = [], [], []
batches = training_batches(CacheDataset(train_set), config.batch_size, config.max_seq_length, 0)
fixed = None
for it in range(config.iters):
    t0 = time.perf_counter()
    _, batch = next(batches)
    if cfg["fixed"]:
        fixed = fixed or batch
        batch = fixed
    t1 = time.perf_counter()
    value, toks = step(batch)
    value.item(); counted.append(int(toks.item()))
    t2 = time.perf_counter()
    fetch.append(t1 - t0); times.append(t2 - t1)
steady = times[3:]
tokens = batch[0].shape[0] * (batch[0].shape[1] - 1)
print(json.dumps({"tok_s_mean": tokens / statistics.mean(steady), "tok_s_min": tokens / min(steady),
                  "trained_tok_s": sum(counted[3:]) / sum(steady), "inputs": batch[0].shape[1] - 1,
                  "step_ms": [round(t * 1000, 1) for t in times], "fetch_ms_mean": 1000 * statistics.mean(fetch[3:]),
                  "peak_gb": mx.get_peak_memory() / 1e9}))
"""


def in_process(
    model: Path, data: Path, batch: int, seq: int, iters: int, fixed: bool, align: int = 32
) -> dict[str, Any]:
    config = {"model": str(model), "data": str(data), "iters": iters, "batch_size": batch, "max_seq_length": seq}
    config["num_layers"] = _lora_layers(model)
    payload = json.dumps({"config": config, "fixed": fixed, "align": align})
    done = subprocess.run([sys.executable, "-c", IN_PROCESS, payload], capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr[-800:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--size", default="1x2048")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--shape", default="qwen2.5-coder-7b")
    parser.add_argument("--in-process-only", action="store_true")
    parser.add_argument("--words", type=int, default=0, help="records of this many words (shorter than the sequence)")
    parser.add_argument("--aligns", default="", help="e.g. 32,128: in-process and product rows padded to each")
    args = parser.parse_args()
    work = Path(args.work)
    model = work / "model"
    if not (model / "config.json").is_file():
        build_model(model, args.shape)
    batch, seq = (int(v) for v in args.size.split("x"))
    words = args.words or seq
    data = build_data(work / f"data-{seq}-{words}", words_per_record=words)
    if args.aligns:
        aligns(model, data, batch, seq, args)
        return
    libs = sorted(
        p.name for p in Path("/usr/lib/x86_64-linux-gnu").glob("*") if "tcmalloc" in p.name or "blas" in p.name
    )
    report({"preloadable": libs}, args.out)
    for align in (1, 32):  # 1: MLX-LM's batches as they come (2047 inputs at 2048)
        got = in_process(model, data, batch, seq, args.iters, fixed=True, align=align)
        report({"variant": f"in-process, inputs padded to a multiple of {align}", **got}, args.out)
    if args.in_process_only:
        return
    variants: dict[str, dict[str, str]] = {
        "product as is": {},
        "product, memory samples every 60 s": {"__interval": "60"},
        "product, no preloads": {"MCP_LOCAL_BLAS": "off", "MCP_LOCAL_MALLOC": "off"},
    }
    for name, env in variants.items():
        interval = env.pop("__interval", None)
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            got = product(model, data, batch, seq, args.iters, False, interval=float(interval) if interval else None)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        report({"variant": name, **got}, args.out)


def aligns(model: Path, data: Path, batch: int, seq: int, args: Any) -> None:
    """Inputs padded to each alignment: MLX's fused (cuDNN) attention backward takes multiples of 128 only."""
    for align in (int(a) for a in args.aligns.split(",")):
        got = in_process(model, data, batch, seq, args.iters, fixed=False, align=align)
        got.pop("step_ms", None)
        report({"variant": f"in-process, inputs padded to a multiple of {align}", **got}, args.out)
        saved = dict(os.environ)
        os.environ["MCP_LOCAL_INPUT_ALIGN"] = str(align)
        try:
            for layerwise in (False, True):
                got = product(model, data, batch, seq, args.iters, layerwise)
                got.pop("losses", None)
                mode = "layerwise" if layerwise else "fast path"
                report({"variant": f"product, {mode}, inputs padded to a multiple of {align}", **got}, args.out)
        finally:
            os.environ.clear()
            os.environ.update(saved)


if __name__ == "__main__":
    main()
