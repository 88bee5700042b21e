"""Which settings hold memory on a GPU: the 7B shape at 1 x 2048, checkpointing variants, compiled or not.

(The run recorded in docs/benchmarks.md also tried an "ordered" checkpointing of our own, whose recomputation waits
for the cotangent via mx.depends; it saved nothing over mlx-lm's on CUDA or the CPU and was removed.)

python3 bench/gpu_memory_variants.py [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory_prediction import measure  # noqa: E402

VARIANTS = [
    ("plain MLX-LM", {"ckpt": False, "chunked": False}, False, True),
    ("plain + mlx-lm checkpointing", {"ckpt": True, "chunked": False}, False, True),
    ("plain + mlx-lm checkpointing, not compiled", {"ckpt": True, "chunked": False}, False, False),
    ("plain kernels + ordered checkpointing + chunked loss", {"ckpt": "ordered", "chunked": True}, False, True),
    ("fast path + ordered checkpointing + chunked loss", {"ckpt": "ordered", "chunked": True}, True, True),
    (
        "fast path + ordered checkpointing + chunked loss, not compiled",
        {"ckpt": "ordered", "chunked": True},
        True,
        False,
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--size", default="1x2048")
    parser.add_argument("--shape", default="qwen2.5-coder-7b")
    args = parser.parse_args()
    batch, seq = (int(v) for v in args.size.split("x"))
    for name, opts, fast, compiled in VARIANTS:
        case = {"shape": args.shape, "batch": batch, "seq": seq, "compile": compiled, **opts}
        row = {"size": args.size, "variant": name, **measure(case, fast, 2)}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
