"""QLoRA of a Qwen2.5-Coder-7B-shaped random 4-bit model on one GPU (MLX's CUDA build), side by side in one run:
plain MLX-LM, our fast quantized path, and our fast path with our memory options (gradient checkpointing of every
layer + chunked cross-entropy). Tokens/s, MLX peak memory and our predicted peak for each; then 4-bit decode tokens/s.

python3 bench/gpu_qlora.py [--out results.jsonl] [--only 1x512,1x2048,4x1024]   (see docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from memory_prediction import SHAPES, measure, predict  # noqa: E402

from trainer.environment.mlx_env import OPS_PER_BUFFER_ENV, mlx_env  # noqa: E402

MODES = {
    "plain MLX-LM": {"fast": False, "ckpt": False, "chunked": False},
    "plain MLX-LM + its grad checkpointing": {"fast": False, "ckpt": True, "chunked": False},
    "ours: fast path": {"fast": True, "ckpt": False, "chunked": False},
    "ours: fast path + checkpointing + chunked loss": {"fast": True, "ckpt": True, "chunked": True},
    "ours: plain kernels + checkpointing + chunked loss": {"fast": False, "ckpt": True, "chunked": True},
    "ours: layerwise step + fast path": {"fast": True, "ckpt": False, "chunked": True, "layerwise": True},
    "ours: layerwise step + plain kernels": {"fast": False, "ckpt": False, "chunked": True, "layerwise": True},
}

DECODE_CHILD = r"""
import json, sys, time
import mlx.core as mx, mlx.nn as nn
from mlx_lm.models import qwen2
from mlx_lm.models.cache import make_prompt_cache
from trainer.engine.fastpath import apply_fast_path
dims, fast = json.loads(sys.argv[1]), sys.argv[2] == "1"
mx.random.seed(0)
model = qwen2.Model(qwen2.ModelArgs.from_dict(dict(dims, model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6)))
model.set_dtype(mx.bfloat16)
nn.quantize(model, group_size=64, bits=4)
mx.eval(model.parameters())
apply_fast_path(model, fast)
out = {}
for label in ("first", "warm"):
    cache = make_prompt_cache(model)
    prompt = mx.random.randint(0, dims["vocab_size"], (1, 128))
    logits = model(prompt, cache=cache); mx.eval(logits)
    y = mx.argmax(logits[:, -1:], axis=-1)
    t = time.perf_counter()
    for _ in range(128):
        logits = model(y, cache=cache)
        y = mx.argmax(logits[:, -1:], axis=-1)
        mx.async_eval(y)
    mx.eval(y)
    out[label] = 128 / (time.perf_counter() - t)
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default="1x512,1x2048,4x1024")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--shape", default="qwen2.5-coder-7b", choices=list(SHAPES))
    args = parser.parse_args()
    sink = open(args.out, "a", encoding="utf-8") if args.out else None  # noqa: SIM115

    def report(row: dict[str, Any]) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    shape = args.shape
    plain_env = {k: v for k, v in os.environ.items() if k != OPS_PER_BUFFER_ENV}
    ours_env = mlx_env(plain_env, Path(tempfile.mkdtemp(prefix="mcp-local-home-")))
    for size in args.only.split(","):
        batch, seq = (int(v) for v in size.split("x"))
        for name in args.modes.split(","):
            mode = MODES[name]
            if name == "plain MLX-LM + its grad checkpointing" and size != "1x2048":
                continue  # the reference row of the issue
            case = {
                "shape": shape,
                "batch": batch,
                "seq": seq,
                "ckpt": mode["ckpt"],
                "chunked": mode["chunked"],
                "layerwise": mode.get("layerwise", False),
            }
            # ours runs in the environment our workers get (trainer/mlx_env.py); plain MLX-LM in MLX's defaults
            env = ours_env if name.startswith("ours") else plain_env
            got = measure(case, mode["fast"], args.steps, env)
            report({"size": size, "mode": name, **got, "predicted_gb": round(predict(case, 2, mode["fast"]), 2)})
    if not args.no_decode:
        # Each mode decodes in two fresh processes sharing a new, empty kernel cache folder (as our server and
        # workers set it up under their home): the first process compiles MLX's CUDA kernels, the second finds them.
        cache_root = Path(tempfile.mkdtemp(prefix="kernel-cache-"))
        for fast in (False, True):
            label = "ours" if fast else "plain MLX-LM"
            env = mlx_env(dict(os.environ), cache_root / label)
            for process in ("new process, empty kernel cache", "new process, kernel cache of the one before"):
                out = subprocess.run(
                    [sys.executable, "-c", DECODE_CHILD, json.dumps(SHAPES[shape]), "1" if fast else "0"],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                result = (
                    json.loads(out.stdout.strip().splitlines()[-1])
                    if out.returncode == 0
                    else {"error": out.stderr[-400:]}
                )
                report({"decode": label, "process": process, **result})
    if sink:
        sink.close()


if __name__ == "__main__":
    main()
