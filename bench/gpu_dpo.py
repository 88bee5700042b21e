"""DPO on CUDA, side by side in one run: the product's path (`python -m trainer run`, mode dpo: one pass over each
pair's two replies, the reference scored once with the adapter off) and mlx-lm-lora's DPO trainer (PyPI
`mlx-lm-lora`: its `train_dpo`, a second copy of the model as the reference, scored every step), on the
Qwen2.5-Coder-7B-shaped random 4-bit model, the same tokenized pairs, batch, LoRA (rank 16 on the last 16 blocks) and
iterations. Prints steps/s, reply tokens/s, MLX's peak and (ours) the prediction.

python3 bench/gpu_dpo.py --work DIR [--iters 20] [--batch 4] [--prompt-words 70] [--reply-words 140] [--out F]
    [--only product,orpo,grpo,mlx-lm-lora]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from gpu_product import build_model, product  # noqa: E402
from memory_prediction import report  # noqa: E402

WORDS = "def return value list index count total result items class self print import from while for".split()


def build_pairs(folder: Path, prompt_words: int, reply_words: int, train: int = 64, valid: int = 8) -> Path:
    """{"prompt", "chosen", "rejected"} records of random words (about 3.6 tokens each with the tiny tokenizer)."""
    rng = random.Random(2)
    folder.mkdir(parents=True, exist_ok=True)

    def say(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    for split, count in (("train", train), ("valid", valid)):
        lines = [
            json.dumps({"prompt": say(prompt_words), "chosen": say(reply_words), "rejected": say(reply_words)})
            for _ in range(count)
        ]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def build_tasks(folder: Path, prompt_words: int, train: int = 16, valid: int = 4) -> Path:
    """{"prompt", "tests"} records of random words: a random model passes none of the tests, and the step (sampling,
    scoring, the reference pass, the update) runs in full."""
    rng = random.Random(3)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("valid", valid)):
        lines = [
            json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(prompt_words)), "tests": "assert f() == 1"})
            for _ in range(count)
        ]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def theirs(model: Path, data: Path, batch: int, iters: int, max_seq_length: int) -> dict[str, Any]:
    """mlx-lm-lora's train_dpo in this process: policy and a reference copy loaded from the same folder."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    from trainer.engine.preference_data import load_pairs

    info = mx.device_info()  # train_dpo sets a wired limit from a key only Metal reports
    patched = {**info, "max_recommended_working_set_size": info.get("max_recommended_working_set_size", 0)}
    mx.device_info = lambda: patched  # type: ignore[assignment]
    mx.set_wired_limit = lambda limit: 0  # type: ignore[assignment]  # a Metal setting: not ours to change here
    policy, tokenizer = load(str(model))[:2]
    reference = load(str(model))[0]
    reference.freeze()
    policy.freeze()
    linear_to_lora_layers(policy, min(16, len(policy.layers)), {"rank": 16, "scale": 2.0, "dropout": 0.0})
    pairs = load_pairs(data / "train.jsonl", tokenizer)
    items = [
        {"chosen": c, "rejected": r, "chosen_prompt_length": p, "rejected_prompt_length": p}
        for c, r, p in zip(pairs.chosen, pairs.rejected, pairs.prompt, strict=True)
    ]
    reports: list[dict[str, Any]] = []

    class Reports(TrainingCallback):  # type: ignore[misc]
        def on_train_loss_report(self, info: dict[str, Any]) -> None:
            reports.append(info)

    args = DPOTrainingArgs(
        batch_size=batch,
        iters=iters,
        val_batches=0,
        steps_per_report=5,
        steps_per_eval=iters * 10,
        steps_per_save=iters * 10,
        max_seq_length=max_seq_length,
        adapter_file=str(data / "their-adapters.safetensors"),
        beta=0.1,
    )
    mx.reset_peak_memory()
    start = time.perf_counter()
    train_dpo(policy, reference, optim.Adam(learning_rate=1e-5), items, None, args, training_callback=Reports())
    wall = time.perf_counter() - start
    steady = reports[1:] or reports  # the first window holds the compilation
    its = [r.get("iterations_per_second", 0.0) for r in steady]
    return {
        "steps_per_s": round(sum(its) / max(len(its), 1), 3),
        "tok_s": round(sum(r.get("tokens_per_second", 0.0) for r in steady) / max(len(steady), 1), 1),
        "peak_gb": round(mx.get_peak_memory() / 1e9, 2),
        "wall_s": round(wall, 1),
        "report_keys": sorted(reports[-1]) if reports else [],
    }


def main() -> None:
    from trainer.environment.preload import reexec_with_preloads

    reexec_with_preloads()  # on a Linux CPU both sides run with OpenBLAS under MLX, as the product's workers do
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=70)
    parser.add_argument("--reply-words", type=int, default=140)
    parser.add_argument("--only", default="product,mlx-lm-lora")
    parser.add_argument("--theirs", action="store_true", help="(internal) run mlx-lm-lora's side in this process")
    parser.add_argument("--out", default=None)
    parser.add_argument("--model", default=None, help="an MLX model folder instead of the random 7B shape")
    args = parser.parse_args()
    work = Path(args.work)
    model = Path(args.model) if args.model else work / "model"
    if not (model / "config.json").is_file():
        build_model(model)
    data = build_pairs(work / f"pairs-{args.prompt_words}-{args.reply_words}", args.prompt_words, args.reply_words)
    seq = 2048
    if args.theirs:
        print(json.dumps(theirs(model, data, args.batch, args.iters, seq)))
        return
    shape = {"batch": args.batch, "prompt_words": args.prompt_words, "reply_words": args.reply_words}
    for mode in ("dpo", "orpo"):  # "product" runs dpo, "orpo" orpo
        if ("product" if mode == "dpo" else mode) in args.only.split(","):
            got = product(model, data, args.batch, seq, args.iters, False, mode=mode)
            report({"who": f"ours (python -m trainer run, mode {mode})", **shape, **got}, args.out)
    if "grpo" in args.only.split(","):  # its prediction against its peak: 4 completions of each prompt
        tasks = build_tasks(work / f"tasks-{args.prompt_words}", args.prompt_words)
        grpo = {"mode": "grpo", "generations": 4, "completion_tokens": args.reply_words * 2, "val_batches": 0}
        got = product(model, tasks, args.batch, seq, args.iters, False, **grpo)
        report({"who": "ours (python -m trainer run, mode grpo)", **shape, **grpo, **got}, args.out)
    if "mlx-lm-lora" in args.only:  # its own process: MLX's peak is per process
        cmd = [sys.executable, __file__, "--work", str(work), "--iters", str(args.iters), "--batch", str(args.batch)]
        cmd += ["--prompt-words", str(args.prompt_words), "--reply-words", str(args.reply_words), "--theirs"]
        cmd += ["--model", str(model)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = (
            json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-1500:]}
        )
        report({"who": "mlx-lm-lora train_dpo (reference: a second copy)", **shape, **got}, args.out)


if __name__ == "__main__":
    main()
