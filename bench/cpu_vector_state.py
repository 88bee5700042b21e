"""What one of our CPU decode operations leaves behind for MLX's own: MLX's `exp` over 153,600 float32 values timed
before and after one `rms_norm` and one `qgemv` of the decode kernel (each in a fresh process), then decode tokens/s of
the SmolLM2-shaped probe model with the kernels and without (decode_choice.measure, the set-up's own measurement).

uv run python bench/cpu_vector_state.py [--out results.jsonl]   (with the workers' preloads: scripts/setup-preload)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
import json, sys, time
import mlx.core as mx
from trainer.engine import decode_kernel
def timed(f, n=20):
    mx.eval(f())
    start = time.perf_counter()
    for _ in range(n):
        mx.eval(f())
    return (time.perf_counter() - start) / n * 1e3
values = mx.random.normal((153600,))
x, w = mx.random.normal((1, 1, 576)), mx.ones((576,))
mx.eval(values, x, w)
before = timed(lambda: mx.exp(values))
kernel = decode_kernel.load()
if sys.argv[1] == "rms_norm":
    mx.eval(kernel.rms_norm(x, w, 1e-5))
else:
    q, s, b = mx.quantize(mx.random.normal((1536, 576)), group_size=64, bits=4)
    mx.eval(kernel.qgemv(x, q, s, b, 64, 4))
after = timed(lambda: mx.exp(values))
print(json.dumps({"op": sys.argv[1], "exp_ms_before": round(before, 3), "exp_ms_after": round(after, 3)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from trainer.engine.decode_choice import IGNORE_ENV, _probe_env, measure
    from trainer.engine.decode_kernel import kernel_path

    env = {**_probe_env(), IGNORE_ENV: "ignore"}
    rows = []
    for op in ("rms_norm", "qgemv"):
        done = subprocess.run([sys.executable, "-c", PROBE, op], capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    with tempfile.TemporaryDirectory() as scratch:
        kernel_path()  # built once per machine
        choice = measure(Path(scratch))
    rows.append({"decode_tok_s_kernels": choice.kernel_tok_s, "decode_tok_s_mlx": choice.mlx_tok_s})
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")  # fmt: skip
    for row in rows:
        line = json.dumps({"cpu": cpu, "cores": os.cpu_count(), **row})
        print(line)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as out:
                out.write(line + "\n")


if __name__ == "__main__":
    main()
