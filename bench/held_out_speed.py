"""Held-out loss against a training step's forward, per token, in one process on the same model and records.

(a) the product's held-out loss (`engine/held_out.record_losses`, what `evaluate` runs) on the model as
    `ModelSession` loads it; (b) the run's own validation forward (the worker's model: `load_for_training` + LoRA,
    its `training_loss`, MLX-LM's batches of 4 at `--max-seq-length`): a training step's forward without the
    backward. Both after a warm-up pass. Run with the preloads (scripts/setup-preload), as every MLX child now is;
    `--no-preload` measures what the evaluation child had before.

uv run python bench/held_out_speed.py DATA_FOLDER MODEL [--split valid] [--max-seq-length 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import types
from pathlib import Path

import mlx.core as mx


def held_out(model_dir: str, records: list[dict], max_seq_length: int) -> tuple[int, float]:
    from trainer.engine.held_out import record_losses
    from trainer.engine.inference import ModelSession

    loaded = ModelSession().loaded(model_dir)
    record_losses(loaded.model, loaded.tokenizer, records[:4], max_seq_length=max_seq_length, mask_prompt=False)
    start = time.perf_counter()
    losses = record_losses(loaded.model, loaded.tokenizer, records, max_seq_length=max_seq_length, mask_prompt=False)
    return sum(t for _, t in losses), time.perf_counter() - start


def training_forward(model_dir: str, records: list[dict], max_seq_length: int) -> tuple[int, float]:
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import iterate_batches

    from trainer.engine.losses import training_loss
    from trainer.engine.mlx_backend import _add_lora, load_for_training
    from trainer.planning.config import QLoRAConfig

    config = QLoRAConfig.parse({"model": model_dir, "data": "/tmp", "num_layers": -1, "max_seq_length": max_seq_length})
    model, tokenizer, _ = load_for_training(config)
    _add_lora(config, model)
    model.eval()
    loss = training_loss(True, False)
    dataset = CacheDataset(create_dataset(records, tokenizer, types.SimpleNamespace(mask_prompt=False)))
    batches = list(iterate_batches(dataset, 4, max_seq_length))[: len(records) // 4]  # one pass over the records
    mx.eval(loss(model, *batches[0]))
    tokens, start = 0, time.perf_counter()
    for batch, lengths in batches:
        value, ntoks = loss(model, batch, lengths)
        mx.eval(value, ntoks)  # the loss itself: ntoks alone would skip the forward
        tokens += int(ntoks.item())
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("model")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--which", choices=["both", "held_out", "training"], default="both")
    args = parser.parse_args()
    records = [json.loads(line) for line in (args.data / f"{args.split}.jsonl").read_text().splitlines()]
    result: dict = {"records": len(records), "machine": platform.processor() or platform.machine(),
                    "preload": os.environ.get("LD_PRELOAD", "")}  # fmt: skip
    measures = {"held_out": held_out, "training": training_forward}
    for which, measure in measures.items():
        if args.which in ("both", which):
            tokens, seconds = measure(args.model, records, args.max_seq_length)
            name = "held_out" if which == "held_out" else "training_forward"
            result[name] = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
