"""Where the fast path's and the layerwise step's time goes on a GPU: the 7B shape, one size, step variants.

python3 bench/gpu_step_variants.py [--size 1x2048] [--only "name;name"] [--env KEY=VALUE] [--out results.jsonl]

Each variant runs in a fresh subprocess (`memory_prediction.measure`): tokens/s (best of the timed steps) and MLX's
peak memory. "kept" is the issue's probe (dequantize then GEMM, autodiff keeps the dequantized weights); "ours" is
`trainer.engine.fastpath` (the backward re-dequantizes).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from memory_prediction import measure, report  # noqa: E402

VARIANTS: dict[str, tuple[bool, dict[str, Any]]] = {
    "plain MLX-LM": (False, {}),
    "plain + mlx-lm checkpointing": (False, {"ckpt": True}),
    "plain + mlx-lm checkpointing, not compiled": (False, {"ckpt": True, "compile": False}),
    "fast ours, compiled step": (True, {}),
    "fast ours, compiled step, one step ahead": (True, {"ahead": True}),
    "fast ours, compiled step, MLX-LM's float32 LoRA": (True, {"lora_f32": True}),
    "fast ours, not compiled": (True, {"compile": False}),
    "fast kept, not compiled (issue probe)": (True, {"compile": False, "fast_impl": "kept"}),
    "fast kept, compiled step": (True, {"fast_impl": "kept"}),
    "fast ours unordered, compiled step": (True, {"fast_impl": "unordered"}),
    "fast ours 64M-element chunks, compiled step": (True, {"fast_impl": "chunked"}),
    "layerwise + fast, eager": (
        True,
        {"layerwise": True, "chunked": True, "lw_compiled": False, "lw_pipelined": False},
    ),
    "layerwise + fast, pipelined": (True, {"layerwise": True, "chunked": True, "lw_compiled": False}),
    "layerwise + fast, compiled": (True, {"layerwise": True, "chunked": True, "lw_pipelined": False}),
    "layerwise + fast, compiled + pipelined": (True, {"layerwise": True, "chunked": True}),
    "layerwise + fast, compiled + pipelined, one step ahead": (
        True,
        {"layerwise": True, "chunked": True, "ahead": True},
    ),
    "layerwise + fast, compiled + pipelined, MLX-LM's float32 LoRA": (
        True,
        {"layerwise": True, "chunked": True, "lora_f32": True},
    ),
    "layerwise + fast unordered, compiled + pipelined": (
        True,
        {"layerwise": True, "chunked": True, "fast_impl": "unordered"},
    ),
    "layerwise + fast recomputed in block backward, compiled + pipelined": (
        True,
        {"layerwise": True, "chunked": True, "fast_impl": "recomputed"},
    ),
    "layerwise + plain kernels, compiled + pipelined": (False, {"layerwise": True, "chunked": True}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="1x2048")
    parser.add_argument("--only", default=";".join(VARIANTS), help="variant names separated by ;")
    parser.add_argument("--shape", default="qwen2.5-coder-7b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the child processes (repeatable)")
    args = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in args.env)
    env = {**os.environ, **extra_env} if extra_env else None
    batch, seq = (int(v) for v in args.size.split("x"))
    for name in args.only.split(";"):
        fast, opts = VARIANTS[name]
        case = {"shape": args.shape, "batch": batch, "seq": seq, "ckpt": False, "chunked": False, **opts}
        row = {"size": args.size, "variant": name, **extra_env, **measure(case, fast, args.steps, env)}
        report(row, args.out)


if __name__ == "__main__":
    main()
