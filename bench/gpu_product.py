"""The speed users get on CUDA, side by side in one run: a Qwen2.5-Coder-7B-shaped random 4-bit model trained through
the product's own path (`python -m trainer run`: the worker subprocess the MCP server starts, with its data pipeline,
evaluation, reports, memory sampling and checkpoints), the in-process step benchmark of the same settings
(memory_prediction.measure), and plain `mlx_lm lora` (the CLI) on the same model folder and data. Text records of
more than SEQ tokens, so that every batch is B x SEQ.

and, with --hf, Hugging Face transformers + PEFT + bitsandbytes NF4 on the same shape (bench/gpu_hf_qlora.py, in its own
process). Ratios to the step benchmark are given against its best step and its mean step (the product's figure is a
mean over its steady report windows).

python3 bench/gpu_product.py [--only 1x2048,4x1024] [--iters 30] [--hf] [--out results.jsonl]   (docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from memory_prediction import SHAPES, measure, predict, report  # noqa: E402

from trainer.environment.mlx_env import OPS_PER_BUFFER_ENV, mlx_env  # noqa: E402

SHAPE = "qwen2.5-coder-7b"
MODES = {"fast path": {"layerwise": False}, "layerwise": {"layerwise": True}}


def build_model(folder: Path, shape: str = SHAPE) -> Path:
    """A random bfloat16 model of the shape, quantized to 4 bits (group 64) and saved as an MLX model folder, with
    the tiny BPE tokenizer (its ids are a subset of the model's vocabulary)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    from trainer.engine.tiny import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder)
    config = dict(SHAPES[shape], model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6)
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config["quantization"] = {"group_size": 64, "bits": 4}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    del model
    mx.clear_cache()  # the runs that follow in their own processes share this GPU (docs/benchmarks.md: the pitfall)
    return folder


def build_data(folder: Path, words_per_record: int, train: int = 48, valid: int = 4) -> Path:
    """{"text": ...} records of random words, each longer than the sequence length once tokenized."""
    rng = random.Random(0)
    vocab = "def return value list index count total result items class self print import from while for".split()
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("valid", valid)):
        lines = [
            json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words_per_record))}) for _ in range(count)
        ]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _lora_layers(model: Path) -> int:
    return min(16, int(json.loads((model / "config.json").read_text())["num_hidden_layers"]))


def product(
    model: Path,
    data: Path,
    batch: int,
    seq: int,
    iters: int,
    layerwise: bool,
    interval: float | None = None,
    warm_steps: int = 0,
    **group: Any,
) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="product-home-"))
    config = {
        "model": str(model),
        "data": str(data),
        "iters": iters,
        "batch_size": batch,
        "max_seq_length": seq,
        "num_layers": _lora_layers(model),
        "learning_rate": 1e-5,
        "steps_per_report": 5,
        "steps_per_eval": iters,
        "val_batches": 1,
        "save_every": iters,
        "layerwise": layerwise,
        "chunked_loss": layerwise,
        "memory_budget_gb": 120,
        "allow_over_budget": True,
        "memory_sample_interval": interval,
        **group,  # num_processes, backend
    }
    path = home / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "--home", str(home), "run", str(path)], capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": done.stderr[-800:]}
    snap = json.loads(done.stdout)
    events = [json.loads(line) for line in Path(snap["run_dir"], "events.jsonl").read_text().splitlines()]
    reports = [e for e in events if e["type"] == "train_report"]
    # the first window holds the compilation; with warm_steps, every report through that step (mixed-length batches
    # compile a graph for each new shape: one epoch meets them all)
    steady = [r for r in reports if r["iteration"] > warm_steps] if warm_steps else reports[1:]
    steady = steady or reports
    tokens = sum(r["tokens_per_second"] / r["iterations_per_second"] * 5 for r in steady)  # 5 steps per report
    seconds = sum(5 / r["iterations_per_second"] for r in steady)
    peaks: dict[int, float] = {}
    for e in events:
        if e["type"] == "memory":
            peaks[e.get("rank", 0)] = max(peaks.get(e.get("rank", 0), 0.0), e["peak_gb"])
    return {
        "tok_s": round(tokens / seconds, 1),
        "steps_per_s": round(5 * len(steady) / seconds, 3),
        "peak_gb": round(max(peaks.values(), default=0.0), 2),
        "rank_peaks_gb": [round(peaks[r], 2) for r in sorted(peaks)],
        "losses": [r["train_loss"] for r in reports],
        "predicted_gb": snap["metrics"]["predicted_peak_gb"],
        "plan_change": snap["metrics"].get("plan_change"),
        "window_tok_s": [round(r["tokens_per_second"], 1) for r in reports],  # compilations show in the early ones
        "wall_s": round(wall, 1),
        "state": snap["state"],
    }


def plain(model: Path, data: Path, batch: int, seq: int, iters: int) -> dict[str, Any]:
    """`mlx_lm lora` as a user runs it (MLX's own environment), with the reference LoRA through its YAML config."""
    work = Path(tempfile.mkdtemp(prefix="plain-"))
    (work / "lora.yaml").write_text("lora_parameters:\n  rank: 16\n  scale: 2.0\n  dropout: 0.0\n", encoding="utf-8")
    command = [
        sys.executable, "-m", "mlx_lm", "lora", "--model", str(model), "--train", "--data", str(data),
        "--iters", str(iters), "--batch-size", str(batch), "--max-seq-length", str(seq),
        "--num-layers", str(_lora_layers(model)), "--learning-rate", "1e-5", "--steps-per-report", "1",
        "--steps-per-eval", "100000", "--val-batches", "1", "--adapter-path", str(work / "adapters"),
        "-c", str(work / "lora.yaml"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != OPS_PER_BUFFER_ENV} | {"NO_COLOR": "1", "TERM": "dumb"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
    text = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)
    # its report lines: iteration, loss and arrow, tokens/s (whole numbers), trained thousands of tokens
    rates = [float(m.replace(",", "")) for m in re.findall(r"^\s*\d+\s+[0-9.]+ [▼▲]\s+([0-9,]+)\s", text, re.M)]
    if not rates:
        return {"error": (done.stdout + done.stderr)[-800:]}
    steady = rates[2:] or rates  # the first steps include compiling
    return {"tok_s": round(sum(steady) / len(steady), 1), "note": "tokens/s as the CLI prints them"}


def hugging_face(size: str) -> dict[str, Any]:
    """bench/gpu_hf_qlora.py on one size, in its own process (torch and MLX do not share the GPU's memory)."""
    script = Path(__file__).with_name("gpu_hf_qlora.py")
    done = subprocess.run([sys.executable, str(script), "--only", size], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr[-800:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="1x2048,4x1024")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--hf", action="store_true", help="also HF + PEFT + bitsandbytes (needs torch and those)")
    parser.add_argument("--shape", default=SHAPE, choices=list(SHAPES), help="another shape to try the script")
    parser.add_argument("--work", default=None, help="a folder kept between calls: its model is built once")
    parser.add_argument("--nccl", action="store_true", help="also each mode as an NCCL group of one process")
    parser.add_argument("--processes", type=int, default=1, help="also N processes (one GPU each), N x the batch")
    parser.add_argument("--warm", action="store_true", help="measure each mode's product after a first run")
    parser.add_argument("--skip-peers", action="store_true", help="no plain mlx_lm or HF rows")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-product-"))
    tic = time.perf_counter()
    model = work / "model"
    if not (model / "config.json").is_file():
        build_model(model, args.shape)
    report({"built_model_s": round(time.perf_counter() - tic, 1), "shape": args.shape}, args.out)
    ours_env = mlx_env(dict(os.environ), Path(tempfile.mkdtemp(prefix="step-home-")))
    products: dict[tuple[str, str], float] = {}
    for size in args.only.split(","):
        batch, seq = (int(v) for v in size.split("x"))
        data = build_data(work / f"data-{seq}", words_per_record=seq)
        for name, mode in MODES.items():
            layerwise = mode["layerwise"]
            if args.warm:  # a user's first run on a machine compiles MLX's CUDA kernels; later runs find them cached
                cold = product(model, data, batch, seq, args.iters, layerwise)
                report({"size": size, "mode": name, "row": "product, first run (kernel cache cold)", **cold}, args.out)
            got = product(model, data, batch, seq, args.iters, layerwise)
            report({"size": size, "mode": name, "row": "product", **got}, args.out)
            case = {"shape": args.shape, "batch": batch, "seq": seq, "ckpt": False, "chunked": layerwise}
            step = measure({**case, "layerwise": layerwise}, True, args.steps, ours_env)
            step["predicted_gb"] = round(predict({**case, "layerwise": layerwise}, 2, True), 2)
            report({"size": size, "mode": name, "row": "step", **step}, args.out)
            if "tok_s" in got and "tok_s" in step:
                ratios = {
                    "over_step_best": got["tok_s"] / step["tok_s"],
                    "over_step_mean": got["tok_s"] / step["tok_s_mean"],
                }
                products[(size, name)] = got["tok_s"]
                report({"size": size, "mode": name, **{k: round(v, 3) for k, v in ratios.items()}}, args.out)
            groups(model, data, batch, seq, layerwise, got, args, f"{size} {name}")
        if args.skip_peers:
            continue
        peers = [("plain mlx_lm lora CLI", plain(model, data, batch, seq, args.iters))]
        if args.hf:
            peers.append(("HF transformers + PEFT + bitsandbytes NF4", hugging_face(size)))
        for who, row in peers:
            report({"size": size, "mode": who, "row": "peer", **row}, args.out)
            for name in MODES:
                if "tok_s" in row and (size, name) in products:
                    ratio = round(products[(size, name)] / row["tok_s"], 3)
                    report({"size": size, "mode": name, "over": who, "ratio": ratio}, args.out)


def groups(
    model: Path, data: Path, batch: int, seq: int, layerwise: bool, alone: dict[str, Any], args: Any, what: str
) -> None:
    """The distributed rows: an NCCL group of one against the plain run (`alone`), and N processes of the same
    per-GPU batch against one process of the same global batch (losses) and of the same per-GPU batch (speed)."""

    def differ(a: dict[str, Any], b: dict[str, Any]) -> float | None:
        if "losses" not in a or "losses" not in b:
            return None
        return float(max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=False)))

    if args.nccl:
        got = product(model, data, batch, seq, args.iters, layerwise, num_processes=1, backend="nccl")
        report(
            {"case": what, "row": "product, NCCL group of one", **got, "max_loss_diff": differ(got, alone)}, args.out
        )
        if "tok_s" in got and "tok_s" in alone:
            report({"case": what, "nccl_one_over_plain": round(got["tok_s"] / alone["tok_s"], 3)}, args.out)
    n = args.processes
    if n > 1:
        got = product(model, data, n * batch, seq, args.iters, layerwise, num_processes=n)
        report({"case": what, "row": f"product, {n} processes x batch {batch}", **got}, args.out)
        same_global = product(model, data, n * batch, seq, args.iters, layerwise)
        report({"case": what, "row": f"product, 1 process x batch {n * batch}", **same_global}, args.out)
        if "tok_s" in got and "tok_s" in alone:
            report(
                {
                    "case": what,
                    "scaling_over_one_gpu": round(got["tok_s"] / alone["tok_s"], 3),
                    "max_loss_diff_vs_same_global_batch": differ(got, same_global),
                },
                args.out,
            )


if __name__ == "__main__":
    main()
