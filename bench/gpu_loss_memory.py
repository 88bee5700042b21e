"""What the loss keeps at its peak on a GPU, the loss alone: a step benchmark for finding causes (#31), not a headline.

A projection (the body's stand-in, trained) feeds the 7B shape's 4-bit head and cross-entropy over packed-batch-sized
hidden states; each variant's value and gradient are evaluated in one graph, as the product's step does, and MLX's
peak above what the inputs hold is reported in units of one chunk's logits (tokens x vocabulary, half precision).
Variants: MLX-LM's plain loss, the fused loss (engine/fused_loss.py) at several chunk sizes, compiled or not, with
MLX's default memory limit or one a few GB above the inputs (as the run's budget sets it).

python3 bench/gpu_loss_memory.py [--tokens 8192] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from memory_prediction import report  # noqa: E402
from step_peaks import measure_steps  # noqa: E402

from trainer.engine.fused_loss import fused_head_loss  # noqa: E402

GB = 1e9


def variant_loss(kind: str, chunk: int) -> Any:
    def loss(projection: mx.array, head: Any, hidden: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
        h = hidden @ projection
        if kind == "plain":
            return (nn.losses.cross_entropy(head(h), targets) * mask).astype(mx.float32).sum()
        fused = fused_head_loss(head, h[None], targets[None], mask[None], chunk_tokens=chunk)
        assert fused is not None
        return fused

    return loss


def measure(kind: str, chunk: int, compiled: bool, headroom_gb: float | None, args: Any, inputs: Any) -> dict:
    projection, head, hidden, targets, mask = inputs
    loss = variant_loss(kind, chunk)

    def step(projection: mx.array) -> tuple[mx.array, mx.array]:
        return mx.value_and_grad(lambda p: loss(p, head, hidden, targets, mask))(projection)

    fn = mx.compile(step) if compiled else step
    mx.synchronize()
    mx.clear_cache()
    floor = mx.get_active_memory()
    default_limit = mx.get_memory_limit()
    if headroom_gb is not None:
        mx.set_memory_limit(int(floor + headroom_gb * GB))
    peaks, times, value = measure_steps(lambda: fn(projection), args.steps)
    mx.set_memory_limit(default_limit)
    chunk_logits = chunk * head.weight.shape[0] * 2
    above = (min(peaks[1:] or peaks) - floor) / GB
    return {
        "loss": kind,
        "chunk": chunk if kind != "plain" else None,
        "compiled": compiled,
        "limit_above_inputs_gb": headroom_gb,
        "peak_above_inputs_gb": round(above, 3),
        "in_chunk_logits": round(above * GB / chunk_logits, 2),
        "step_s": round(min(times[1:] or times), 4),
        "value": float(value.item()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--headroom", type=float, default=3.0, help="GB above the inputs for the limited rows")
    parser.add_argument("--chunks", default="1024,512,256")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    mx.random.seed(0)
    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    head = nn.Linear(args.hidden, args.vocab, bias=False)
    head.set_dtype(dtype)
    head = nn.QuantizedLinear.from_linear(head, group_size=64, bits=4)
    hidden = (mx.random.normal((args.tokens, args.hidden)) * 0.5).astype(dtype)
    projection = (mx.eye(args.hidden) + 0.01 * mx.random.normal((args.hidden, args.hidden))).astype(dtype)
    targets = mx.random.randint(0, args.vocab, (args.tokens,))
    mask = mx.ones((args.tokens,), dtype=dtype)
    mx.eval(head.parameters(), hidden, projection, targets, mask)
    inputs = (projection, head, hidden, targets, mask)
    rows = [("plain", 1024)] + [("fused", int(c)) for c in args.chunks.split(",")]
    for kind, chunk in rows:
        for compiled in (True, False):
            for headroom in (None, args.headroom):
                row = measure(kind, chunk, compiled, headroom, args, inputs)
                row.update(device=str(mx.default_device()), tokens=args.tokens, vocab=args.vocab)
                report(row, args.out)


if __name__ == "__main__":
    main()
