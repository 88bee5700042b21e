"""The plan family on CUDA, through the product's own path (`python -m trainer run`, gpu_product.product): the
7B-shaped 4-bit model at 1x2048 on records longer than the sequence, and at batch 4 on mixed-length chat records
(100 to 2,048 tokens, `mask_prompt`), each memory-saving plan side by side with the unconstrained fast path; with
--budget, also what `fit_to_budget` chooses for that budget (run with room to show its real peak), and the run with
`fit_to_budget` itself, the budget enforced (its first-steps check may change the plan: `plan_change`).

python3 bench/gpu_plans.py --work DIR [--iters 20] [--only fixed,chat] [--budget 16] [--out results.jsonl]
    [--model FOLDER --seq 256 --batch 2]   (another model, e.g. the demo's imported SmolLM2 on the CPU)

A variant's "env" is set for its run only (e.g. MCP_LOCAL_QUEUE_PASSES=1: accumulated passes queued without a wait
for each, an experiment).

(The session-14 rows named "fused loss" and "micro-batches of N" ran earlier versions: a loss fused over the
vocabulary, since dropped, and passes of N examples, since replaced by `pass_tokens`; docs/benchmarks.md.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any
from unittest.mock import patch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_product import build_data, build_model, product  # noqa: E402
from memory_prediction import report  # noqa: E402

WORDS = "def return value list index count total result items class self print import from while for".split()
#: the tiny tokenizer makes about 3.6 tokens of one of these words (and its space)
TOKENS_PER_WORD = 3.6

FIXED: dict[str, dict[str, Any]] = {
    "fast path (unconstrained)": {},
    "chunked loss": {"chunked_loss": True},
    "recompute 4 blocks": {"grad_checkpoint": True, "checkpoint_blocks": 4},
    "recompute 16 blocks": {"grad_checkpoint": True},
    "chunked loss + recompute 4 blocks": {"chunked_loss": True, "grad_checkpoint": True, "checkpoint_blocks": 4},
    "layerwise": {"layerwise": True, "chunked_loss": True},
}
PASSES_2048_RECOMPUTE_4 = {"pass_tokens": 2048, "grad_checkpoint": True, "checkpoint_blocks": 4}
FUSED_9 = {"chunked_loss": True, "grad_checkpoint": True, "checkpoint_blocks": 9}
LIMITED_PASSES_2048 = {"pass_tokens": 2048, "chunked_loss": True, "env": {"MCP_LOCAL_MLX_MEMORY_LIMIT_GB": "15.5"}}
CHAT: dict[str, dict[str, Any]] = {
    "fast path (unconstrained)": {},
    "chunked loss": {"chunked_loss": True},
    "passes of 2048 tokens": {"pass_tokens": 2048},
    "passes of 4096 tokens": {"pass_tokens": 4096},
    "passes of 4096 tokens queued": {"pass_tokens": 4096, "env": {"MCP_LOCAL_QUEUE_PASSES": "1"}},
    "passes of 1024 tokens": {"pass_tokens": 1024},
    "passes of 1024 tokens queued": {"pass_tokens": 1024, "env": {"MCP_LOCAL_QUEUE_PASSES": "1"}},
    "passes of 2048 tokens + recompute 4 blocks": PASSES_2048_RECOMPUTE_4,
    "passes of 2048 tokens + recompute 16 blocks": {"pass_tokens": 2048, "grad_checkpoint": True},
    "chunked loss + recompute 9 blocks": FUSED_9,
    "chunked loss + recompute 9 blocks + MLX memory limit 16 GB": {
        **FUSED_9,
        "env": {"MCP_LOCAL_MLX_MEMORY_LIMIT_GB": "16"},
    },
    "chunked loss + recompute 10 blocks + MLX memory limit 16 GB": {
        **FUSED_9,
        "checkpoint_blocks": 10,
        "env": {"MCP_LOCAL_MLX_MEMORY_LIMIT_GB": "16"},
    },
    "passes of 4096 tokens + chunked loss + recompute 6 blocks": {
        "pass_tokens": 4096,
        "chunked_loss": True,
        "grad_checkpoint": True,
        "checkpoint_blocks": 6,
    },
    "passes of 2048 tokens + recompute 4 blocks queued": {
        **PASSES_2048_RECOMPUTE_4,
        "env": {"MCP_LOCAL_QUEUE_PASSES": "1"},
    },
    "passes of 2048 tokens + chunked loss + MLX memory limit 15.5 GB": LIMITED_PASSES_2048,
    "passes of 2048 tokens + chunked loss + MLX memory limit 15.5 GB queued": {
        **LIMITED_PASSES_2048,
        "env": {"MCP_LOCAL_MLX_MEMORY_LIMIT_GB": "15.5", "MCP_LOCAL_QUEUE_PASSES": "1"},
    },
    "passes of 4096 tokens + chunked loss + recompute 8 blocks + MLX memory limit 15.5 GB queued": {
        "pass_tokens": 4096,
        "chunked_loss": True,
        "grad_checkpoint": True,
        "checkpoint_blocks": 8,
        "env": {"MCP_LOCAL_MLX_MEMORY_LIMIT_GB": "15.5", "MCP_LOCAL_QUEUE_PASSES": "1"},
    },
    "chunked loss (256-token chunks) + recompute 9 blocks + MLX memory limit 15.5 GB": {
        **FUSED_9,
        "env": {"MCP_LOCAL_MLX_MEMORY_LIMIT_GB": "15.5", "MCP_LOCAL_FUSED_LOSS_CHUNK": "256"},
    },
    "chunked loss + recompute 9 blocks + MLX memory limit 15.5 GB": {
        **FUSED_9,
        "env": {"MCP_LOCAL_MLX_MEMORY_LIMIT_GB": "15.5"},
    },
    "chunked loss + recompute 16 blocks + MLX memory limit 15.5 GB": {
        **FUSED_9,
        "checkpoint_blocks": 16,
        "env": {"MCP_LOCAL_MLX_MEMORY_LIMIT_GB": "15.5"},
    },
    "layerwise": {"layerwise": True, "chunked_loss": True},
}


def build_chat(folder: Path, train: int = 64, valid: int = 8, low: int = 100, high: int = 2048) -> Path:
    """{"messages": [user, assistant]} records of random words, 100 to 2,048 tokens in all, 30% of them prompt."""
    rng = random.Random(1)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("valid", valid)):
        lines = []
        for _ in range(count):
            words = int(rng.uniform(low, high - 40) / TOKENS_PER_WORD)
            asked = max(1, int(words * 0.3))
            say = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
            messages = [{"role": "user", "content": say(asked)}, {"role": "assistant", "content": say(words - asked)}]
            lines.append(json.dumps({"messages": messages}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--only", default="fixed,chat")
    parser.add_argument("--budget", type=float, default=None, help="also fit_to_budget's plan for this budget")
    parser.add_argument("--variants", default=None, help="comma-separated variant names to run (default: all)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--model", default=None, help="an MLX model folder instead of the random 7B shape")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warm-steps", type=int, default=0, help="time only the reports after this step")
    parser.add_argument("--batch", type=int, default=1, help="the fixed-length set's batch")
    parser.add_argument("--packing", action="store_true", help="chat records packed into rows (every variant)")
    parser.add_argument("--budget-runs", default="fitted,enforced", help="with --budget: fitted, enforced")
    args = parser.parse_args()
    work = Path(args.work)
    model = Path(args.model) if args.model else work / "model"
    if not (model / "config.json").is_file():
        build_model(model)
    seq = args.seq
    sets = {
        "fixed": (build_data(work / f"data-{seq}", words_per_record=seq), args.batch, {}, FIXED),
        "chat": (build_chat(work / "chat", high=seq), 4, {"mask_prompt": True, "packing": args.packing}, CHAT),
    }
    for name in args.only.split(","):
        data, batch, common, variants = sets[name]
        if args.variants is not None:
            variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
        rows = dict(variants)
        for variant, settings in rows.items():
            settings = dict(settings)
            layerwise = settings.pop("layerwise", False)
            with patch.dict(os.environ, settings.pop("env", {})):  # for this run's worker only
                got = product(
                    model, data, batch, seq, args.iters, layerwise, warm_steps=args.warm_steps, **common, **settings
                )
            report({"data": name, "batch": batch, "variant": variant, **common, **got}, args.out)
        runs = args.budget_runs.split(",") if args.budget else []
        if "fitted" in runs:  # the plan the product chooses for this budget, run with room to show its real peak
            chosen = fitted(model, data, batch, seq, args.budget, common)
            settings = dict(chosen["settings"])
            layerwise = settings.pop("layerwise", False)
            got = product(
                model, data, batch, seq, args.iters, layerwise, warm_steps=args.warm_steps, **common, **settings
            )
            row = {"data": name, "batch": batch, "variant": f"fit_to_budget {args.budget:g} GB", **chosen, **got}
            report({**row, "within_budget": got.get("peak_gb", 1e9) <= args.budget}, args.out)
        if "enforced" in runs:  # the product's own path: fit_to_budget in the run, the budget enforced, first steps
            enforced = {"memory_budget_gb": args.budget, "allow_over_budget": False, "fit_to_budget": True}
            got = product(model, data, batch, seq, args.iters, False, warm_steps=args.warm_steps, **common, **enforced)
            row = {"data": name, "batch": batch, "variant": f"fit_to_budget {args.budget:g} GB in the run", **got}
            report({**row, "within_budget": got.get("peak_gb", 1e9) <= args.budget}, args.out)


def fitted(model: Path, data: Path, batch: int, seq: int, budget: float, common: dict[str, Any]) -> dict[str, Any]:
    """What fit_to_budget changes for this run and budget (the product's own search, nothing started)."""
    from gpu_product import _lora_layers

    from trainer.planning.config import QLoRAConfig
    from trainer.planning.predict import predict_run

    raw = {"model": str(model), "data": str(data), "batch_size": batch, "max_seq_length": seq, **common}
    raw.update(num_layers=_lora_layers(model), memory_budget_gb=budget, fit_to_budget=True)
    prediction = predict_run(QLoRAConfig.parse(raw))
    settings = dict(change.split("=", 1) for change in prediction.changes)
    parsed = {k: json.loads(v.lower()) if v not in ("None",) else None for k, v in settings.items()}
    return {"settings": parsed, "choice": prediction.choice, "fit_predicted_gb": prediction.prediction.total_gb}


if __name__ == "__main__":
    main()
