"""Predicted vs measured peak memory of QLoRA training steps over a grid of shapes and settings.

uv run python bench/memory_prediction.py [--device cpu|gpu] [--grid cpu|gpu] [--out results.json]

Each configuration runs in a fresh subprocess: a random-weight model of the given shape, quantized to 4 bits
(group 64), LoRA rank 16, Adam, mlx-lm's compiled training step (as our worker runs it: LoRA in half precision
unless the case says `lora_f32`), a first step, the allocator's cache cleared, an untimed step that refills it, then
the timed steps; the measured peak is MLX's peak memory after the first step. Tokens/s: of the best timed step, and
of all of them (`tok_s_mean`), with each step's seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 8192,
        "tie_word_embeddings": True,
    },
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "qwen2.5-0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "qwen2.5-coder-7b": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
}
GRIDS: dict[str, list[dict[str, Any]]] = {
    "cpu": [
        {"shape": "tiny", "batch": 4, "seq": 256, "ckpt": False, "chunked": False},
        {"shape": "tiny", "batch": 4, "seq": 256, "ckpt": True, "chunked": True},
        {"shape": "smollm2-135m", "batch": 1, "seq": 128, "ckpt": False, "chunked": False},
        {"shape": "smollm2-135m", "batch": 4, "seq": 128, "ckpt": False, "chunked": False},
        {"shape": "smollm2-135m", "batch": 2, "seq": 512, "ckpt": False, "chunked": False},
        {"shape": "smollm2-135m", "batch": 2, "seq": 512, "ckpt": True, "chunked": False},
        {"shape": "smollm2-135m", "batch": 2, "seq": 512, "ckpt": True, "chunked": True},
        {"shape": "qwen2.5-0.5b", "batch": 1, "seq": 256, "ckpt": False, "chunked": False},
        {"shape": "qwen2.5-0.5b", "batch": 2, "seq": 512, "ckpt": False, "chunked": False},
        {"shape": "qwen2.5-0.5b", "batch": 2, "seq": 512, "ckpt": True, "chunked": True},
        {"shape": "smollm2-135m", "batch": 2, "seq": 512, "ckpt": False, "chunked": False, "layerwise": True},
        {"shape": "qwen2.5-0.5b", "batch": 2, "seq": 512, "ckpt": False, "chunked": False, "layerwise": True},
    ],
    "gpu": [
        {"shape": "qwen2.5-coder-7b", "batch": 1, "seq": 512, "ckpt": False, "chunked": False},
        {"shape": "qwen2.5-coder-7b", "batch": 1, "seq": 2048, "ckpt": False, "chunked": False},
        {"shape": "qwen2.5-coder-7b", "batch": 1, "seq": 2048, "ckpt": True, "chunked": False},
        {"shape": "qwen2.5-coder-7b", "batch": 1, "seq": 2048, "ckpt": True, "chunked": True},
        {"shape": "qwen2.5-coder-7b", "batch": 4, "seq": 1024, "ckpt": True, "chunked": True},
    ],
}

CHILD = r"""
import json, sys, time
from functools import partial
import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
from mlx.utils import tree_map
from mlx_lm.models import qwen2
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.tuner.utils import linear_to_lora_layers
from trainer.engine.fastpath import apply_fast_path
from trainer.engine.losses import cross_entropy_for, training_loss
cfg = json.loads(sys.argv[1])
shape = dict(cfg["dims"], model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6)
mx.random.seed(0)
model = qwen2.Model(qwen2.ModelArgs.from_dict(shape))
if mx.default_device() != mx.cpu:
    model.set_dtype(mx.bfloat16)
nn.quantize(model, group_size=64, bits=4)
mx.eval(model.parameters())
fast = apply_fast_path(model, cfg["fast"])
from trainer.engine.patches import fast_activations
patched = fast_activations(model)  # held for the whole child process
patched.__enter__()
import trainer.engine.fastpath as fp
impl = cfg.get("fast_impl")
if impl == "kept":  # the issue's probe: a plain dequantize then GEMM, the dequantized weight kept for the backward
    fp._dense = lambda module, x: x @ mx.dequantize(module["weight"], module["scales"], module["biases"],
        group_size=module.group_size, bits=module.bits, mode=module.mode).astype(x.dtype).T
elif impl == "unordered":  # our recomputing VJP without its ordering on the cotangent
    mx.depends = lambda inputs, dependencies: inputs
elif impl == "chunked":  # the GPU chunking of the first H100/H200 runs
    fp.GPU_CHUNK_ELEMENTS = 64 * 1024 * 1024
elif impl == "recomputed":  # the layerwise step without keep_dequantized in its block backward
    import contextlib
    import trainer.engine.layerwise as lw
    lw.keep_dequantized = contextlib.nullcontext
if cfg.get("dense"):
    from trainer.engine.fastpath import cache_dense_weights
    cache_dense_weights(model, 1 << 62)
model.freeze()
linear_to_lora_layers(model, cfg["layers"], {"rank": 16, "scale": 2.0, "dropout": 0.0})
if cfg["fast"] is not False and not cfg.get("lora_f32"):  # as our worker (MLX-LM's own float32 LoRA for plain rows)
    from trainer.engine.lora_math import lora_in_half_precision
    lora_in_half_precision(model)
if cfg["ckpt"]:
    grad_checkpoint(model.layers[0])
loss = training_loss(fast, cfg["chunked"])  # as our worker's step
opt = optim.Adam(learning_rate=1e-5)
vg = nn.value_and_grad(model, loss)
state = [model.state, opt.state, mx.random.state]
def step(batch, lengths):
    (l, n), g = vg(model, batch, lengths)
    opt.update(model, g)
    return l, n
if cfg.get("layerwise"):
    from trainer.engine.layerwise import layerwise_value_and_grad
    functions = {}  # traced once, as the layerwise step does
    def step(batch, lengths):
        l, n, g = layerwise_value_and_grad(model, batch, lengths, compiled=cfg.get("lw_compiled", True),
                                           pipelined=cfg.get("lw_pipelined"), functions=functions,
                                           ce=cross_entropy_for(fast))
        opt.update(model, g)
        return l, n
elif cfg.get("compile", True):
    step = partial(mx.compile, inputs=state, outputs=state)(step)
B, T = cfg["batch"], cfg["seq"]
x = mx.random.randint(0, shape["vocab_size"], (B, T + 1), key=mx.random.key(1))
lengths = mx.array([[0, T]] * B)
l, n = step(x, lengths); mx.eval(state, l)
mx.clear_cache(); mx.reset_peak_memory(); base_gb = mx.get_active_memory() / 1e9
l, n = step(x, lengths); mx.eval(state, l)  # refills the allocator's cache: the timed steps are steady ones
times = []
if cfg.get("ahead"):  # each step dispatched before the one before it is read: the device never waits for Python
    t = time.perf_counter(); prev = None
    for _ in range(cfg["steps"]):
        l, n = step(x, lengths); mx.async_eval(state, l, n)
        if prev is not None:
            prev.item()
        prev = l
    l.item(); times = [(time.perf_counter() - t) / cfg["steps"]]
for _ in range(0 if cfg.get("ahead") else cfg["steps"]):
    t = time.perf_counter(); l, n = step(x, lengths); mx.eval(state, l); times.append(time.perf_counter() - t)
peak_gb = mx.get_peak_memory() / 1e9
print(json.dumps({"peak_gb": peak_gb, "base_gb": base_gb, "tok_s": B * T / min(times), "step_s": times,
                  "tok_s_mean": B * T * len(times) / sum(times), "loss": l.item()}))
"""


def report(row: dict[str, Any], out: str | None) -> None:
    """A result row: printed, and appended to `out` (JSON lines) when given."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


#: a case's optional settings passed on to the child (bench/gpu_step_variants.py)
OPTIONS = ("fast_impl", "lw_compiled", "lw_pipelined", "ahead", "lora_f32")


def measure(case: dict[str, Any], fast: bool | None, steps: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    payload = {
        "dims": SHAPES[case["shape"]],
        "batch": case["batch"],
        "seq": case["seq"],
        "ckpt": case["ckpt"],
        "chunked": case["chunked"],
        "fast": fast,
        "compile": case.get("compile", True),
        "dense": case.get("dense", False),
        "layerwise": case.get("layerwise", False),
        "layers": 16,
        "steps": steps,
        **{k: case[k] for k in OPTIONS if k in case},
    }
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr[-500:]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def predict(case: dict[str, Any], compute_bytes: int, fast: bool = True) -> float:
    from trainer.planning.memory_estimate import MemoryPlan, predict_peak

    config = dict(SHAPES[case["shape"]], model_type="qwen2", quantization={"group_size": 64, "bits": 4})
    plan = MemoryPlan(
        batch_size=case["batch"],
        seq_len=case["seq"],
        num_layers=16,
        rank=16,
        grad_checkpoint=case["ckpt"],
        chunked_loss=case["chunked"],
        quantize_bits=4,
        compute_bytes=compute_bytes,
        device="cpu" if compute_bytes == 4 else "gpu",
        fast_path=fast,
        layerwise=bool(case.get("layerwise")),
    )
    return predict_peak(config, plan).total_gb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", choices=list(GRIDS), default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    compute_bytes = 4 if args.grid == "cpu" else 2
    rows = []
    for case in GRIDS[args.grid]:
        got = measure(case, None, args.steps)
        predicted = predict(case, compute_bytes)
        row = {**case, "predicted_gb": round(predicted, 3), **got}
        if "peak_gb" in got:
            row["error_pct"] = round(100 * (predicted - got["peak_gb"]) / got["peak_gb"], 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
