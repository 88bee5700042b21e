"""Decode tokens/s of a random-weight 4-bit model of one of the benchmark shapes, as `ModelSession` runs it: plain
MLX-LM against ours (used by cpu_qlora.py; on its own for machines without the bundled model or PyTorch).

uv run python bench/cpu_decode_shape.py --shape qwen2.5-coder-7b --tokens 8 --prompt 4 [--modes plain,ours] [--out F]
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
from memory_prediction import SHAPES, report  # noqa: E402

from trainer.environment.preload import preload_env  # noqa: E402

# decode of a random-weight model of a training shape (4-bit, group 64), as ModelSession would run it
SHAPE_DECODE_CHILD = r"""
import json, os, sys, time
import mlx.core as mx, mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.models import qwen2
from trainer.engine.fastpath import apply_fast_path, cache_dense_weights
from trainer.engine.inference import dense_cache_budget
dims, fast, n, prompt_len = json.loads(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
mx.random.seed(0)
model = qwen2.Model(qwen2.ModelArgs.from_dict(dict(dims, model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6)))
nn.quantize(model, group_size=64, bits=4)
mx.eval(model.parameters())
if apply_fast_path(model, fast):
    cache_dense_weights(model, dense_cache_budget())
from trainer.engine.patches import fast_activations
patched = fast_activations(model)  # held for the whole child process, as a generation holds it
patched.__enter__()
mx.eval(model.parameters())
built = time.perf_counter()
prompt = mx.random.randint(0, dims["vocab_size"], (prompt_len,), key=mx.random.key(1))
def run(n):
    stamps, tokens = [], []
    for token, _ in generate_step(prompt, model, max_tokens=n):
        stamps.append(time.perf_counter()); tokens.append(int(token))
    return stamps, tokens
run(max(2, n // 8))
stamps, tokens = run(n)
from trainer.engine.decode_kernel import load
print(json.dumps({"decode_tok_s": (len(stamps) - 2) / (stamps[-1] - stamps[1]), "first_tokens": tokens[:12],
                  "tokens": len(tokens), "build_s": built - start, "threads": os.cpu_count(),
                  "kernel": fast and load() is not None, "preload": os.environ.get("LD_PRELOAD", "")}))
"""


def decode_shape(shape: str, fast: str, env: dict[str, str], tokens: int = 64, prompt: int = 32) -> dict[str, Any]:
    """One process: build the model, decode `tokens` greedy tokens after a warm-up; fast is "1" (ours) or "0"."""
    child = [sys.executable, "-c", SHAPE_DECODE_CHILD, json.dumps(SHAPES[shape]), fast, str(tokens), str(prompt)]
    out = subprocess.run(child, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr[-300:]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (random ids)")
    parser.add_argument("--modes", default="plain,ours", help="plain (MLX-LM as installed), ours")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    for mode in args.modes.split(","):
        env = preload_env(dict(os.environ))  # ours as our workers run: OpenBLAS and tcmalloc preloaded where found
        if mode == "plain":
            env = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
            env["MCP_LOCAL_BLAS"] = env["MCP_LOCAL_MALLOC"] = "off"
        row = {"decode": f"{args.shape} shape, random 4-bit weights", "who": mode, "prompt": args.prompt}
        row.update(decode_shape(args.shape, "1" if mode == "ours" else "0", env, args.tokens, args.prompt))
        report(row, args.out)


if __name__ == "__main__":
    main()
