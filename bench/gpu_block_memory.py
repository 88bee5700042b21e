"""What one trained block keeps for the backward pass on a GPU: a step benchmark for finding causes (#31).

Models of the 7B shape with 1 and 3 blocks (a small vocabulary, so the loss is negligible), 4-bit, the fast path and
half-precision LoRA on every block as the product sets them; the compiled step's peak above its inputs, per block
(the difference of the two, halved), at batch 4 x 2,048 with the causal mask and with a packed batch's additive
mask; and with the MLP's activation (and the down projection's input) recomputed in the backward pass, keeping only
the gate's and up projection's outputs.

python3 bench/gpu_block_memory.py [--batch 4] [--seq 2048] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from memory_prediction import report  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from step_peaks import measure_steps  # noqa: E402

GB = 1e9
SHAPE = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4}


def lean_mlp(mlp: Any) -> None:
    """The MLP's swiglu and down projection recomputed from the gate's and up projection's outputs."""
    from mlx_lm.models.activations import swiglu

    from trainer.engine.recompute import recomputed

    base = type(mlp)

    def __call__(self: Any, x: mx.array) -> mx.array:
        down = self.down_proj
        names, values = zip(*tree_flatten(down.trainable_parameters()), strict=True)

        def forward(g: mx.array, u: mx.array, *params: mx.array) -> mx.array:
            down.update(tree_unflatten(list(zip(names, params, strict=True))))
            return down(swiglu(g, u))  # type: ignore[no-any-return]

        return recomputed(forward)(self.gate_proj(x), self.up_proj(x), *values)

    mlp.__class__ = type(f"Lean{base.__name__}", (base,), {"__call__": __call__})


def build(layers: int, vocab: int, lean: bool) -> Any:
    from mlx_lm.models import qwen2
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from trainer.engine.fastpath import apply_fast_path
    from trainer.engine.lora_math import lora_in_half_precision

    config = dict(SHAPE, num_hidden_layers=layers, vocab_size=vocab, model_type="qwen2", rms_norm_eps=1e-6)
    config.update(rope_theta=1e6, tie_word_embeddings=False)
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4)
    apply_fast_path(model, True)
    model.freeze()
    linear_to_lora_layers(model, layers, {"rank": 16, "scale": 2.0, "dropout": 0.0})
    lora_in_half_precision(model)
    if lean:
        for layer in model.model.layers:
            lean_mlp(layer.mlp)
    mx.eval(model.parameters())
    return model


def measure(layers: int, mask_kind: str, lean: bool, args: Any) -> dict[str, Any]:
    from trainer.engine.packing import segment_mask

    model = build(layers, args.vocab, lean)
    tokens = mx.random.randint(0, args.vocab, (args.batch, args.seq))
    if mask_kind == "packed":  # records of 100 to 2,048 tokens, as the chat set's
        segments = mx.cumsum((mx.random.uniform(shape=(args.batch, args.seq)) < 1 / 700).astype(mx.int32), axis=1)
        mask: Any = segment_mask(segments, mx.bfloat16)
    else:
        mask = "causal"

    def loss(model: Any, tokens: mx.array) -> mx.array:
        hidden = model.model.embed_tokens(tokens)
        for layer in model.model.layers:
            hidden = layer(hidden, mask)
        logits = model.lm_head(model.model.norm(hidden))
        return nn.losses.cross_entropy(logits[:, :-1], tokens[:, 1:]).astype(mx.float32).mean()

    value_and_grad = nn.value_and_grad(model, loss)

    @mx.compile
    def step(tokens: mx.array) -> tuple[mx.array, Any]:
        return value_and_grad(model, tokens)

    mx.eval(tokens, mask if mask_kind == "packed" else tokens)
    mx.synchronize()
    mx.clear_cache()
    floor = mx.get_active_memory()
    peaks, times, value = measure_steps(lambda: step(tokens), args.steps)
    return {
        "layers": layers,
        "mask": mask_kind,
        "lean_mlp": lean,
        "peak_above_inputs_gb": round((min(peaks[1:]) - floor) / GB, 3),
        "step_s": round(min(times[1:]), 4),
        "value": float(value.item()) if value is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--shape", default=None, help="JSON overriding the 7B dimensions (a small run on the CPU)")
    args = parser.parse_args()
    if args.shape:
        SHAPE.update(json.loads(args.shape))
    for mask_kind in ("causal", "packed"):
        for lean in (False, True):
            rows = [measure(layers, mask_kind, lean, args) for layers in (1, 3)]
            per_block = (rows[1]["peak_above_inputs_gb"] - rows[0]["peak_above_inputs_gb"]) / 2
            per_block_s = (rows[1]["step_s"] - rows[0]["step_s"]) / 2
            for row in rows:
                row.update(per_block_gb=round(per_block, 3), per_block_s=round(per_block_s, 4))
                row.update(device=str(mx.default_device()), batch=args.batch, seq=args.seq)
                report(row, args.out)


if __name__ == "__main__":
    main()
