"""Preference training on the bundled real model, through the product's own path: `python -m trainer run` with
mode dpo (or orpo) on the bundled house-style pairs (chosen: the house style; rejected: SmolLM2's own reply), then
`python -m trainer evaluate` on the 72 held-out pairs of 12 functions no training pair names: how often the model
gives the chosen reply the higher log-probability, base against adapter, with the paired 95% interval over functions.

It also writes: each of the 12 held-out functions asked once (the house-style held-out prompts), base and adapter
greedy, each reply scored by the house-style checker (mcp_local_demo/house_style.py), with the paired interval.

python3 bench/preference_gain.py [--mode dpo] [--iters 100] [--out results.jsonl]
python3 bench/preference_gain.py --adapter RUN/adapters   (only the writing check, for a run already trained)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def house_style_writing(model: Path, adapter: str) -> dict[str, object]:
    """The held-out prompts answered by base and adapter; the share of replies in the full house style and the mean
    checker score, each base -> adapter with its paired interval over the 12 functions."""
    from mcp_local_demo.bundled import house_style_data
    from mcp_local_demo.house_style import load_heldout, score_reply
    from trainer.engine.inference import ModelSession
    from trainer.results.intervals import paired_change

    session = ModelSession()
    scores: dict[str, list[float]] = {"base": [], "adapter": []}
    replies: dict[str, list[str]] = {"base": [], "adapter": []}
    for prompt in load_heldout(house_style_data()):
        for name, with_adapter in (("base", None), ("adapter", adapter)):
            reply = session.generate(prompt.prompt, max_tokens=160, model=str(model), adapter=with_adapter).text
            scores[name].append(score_reply(reply, prompt.function).score)
            replies[name].append(reply)
    ones = [1.0] * len(scores["base"])
    full = {k: [float(v == 1.0) for v in vals] for k, vals in scores.items()}
    return {
        "checker_score": paired_change(
            "house-style score", (scores["base"], ones), (scores["adapter"], ones), higher_is_better=True
        ).model_dump(),
        "full_house_style": paired_change(
            "replies in the full house style", (full["base"], ones), (full["adapter"], ones), higher_is_better=True
        ).model_dump(),
        "first_replies": {k: v[:2] for k, v in replies.items()},
    }


def main() -> None:
    from trainer.environment.preload import reexec_with_preloads

    reexec_with_preloads()  # OpenBLAS under MLX, as the product's own processes run
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="dpo")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--adapter", default=None, help="only the writing check, for this adapter")
    args = parser.parse_args()
    from cli_run import train_through_cli, write_row

    from mcp_local_demo.bundled import house_style_preferences, smollm2_gguf
    from trainer.engine.gguf import cached_import

    model = cached_import(smollm2_gguf(), Path("demo-output") / "models")
    if args.adapter:
        print(json.dumps({"adapter": args.adapter, **house_style_writing(model, args.adapter)}))
        return
    config = {
        "model": str(model),
        "data": str(house_style_preferences()),
        "mode": args.mode,
        "beta": args.beta,
        "iters": args.iters,
        "batch_size": 4,
        "learning_rate": args.learning_rate,
        "max_seq_length": 512,
        "steps_per_report": 10,
        "steps_per_eval": 25,
        "val_batches": -1,
        "save_every": 50,
    }
    run, train_s, trainer = train_through_cli(config, "preference-home-")
    scored = subprocess.run([*trainer, "evaluate", run["id"], "--limit", "0"], capture_output=True, text=True)
    if scored.returncode != 0:
        sys.exit(scored.stderr[-2000:])
    evaluation = json.loads(scored.stdout)
    events = [json.loads(line) for line in Path(run["run_dir"], "events.jsonl").read_text().splitlines()]
    vals = [e for e in events if e["type"] == "val_report"]
    row = {
        "mode": args.mode,
        "iters": args.iters,
        "learning_rate": args.learning_rate,
        "beta": args.beta,
        "train_seconds": round(train_s, 1),
        "tokens_per_second": run["metrics"]["average_tokens_per_second"],
        "peak_gb": run["metrics"]["peak_memory_gb"],
        "predicted_gb": run["metrics"]["predicted_peak_gb"],
        "validation": [
            {k: round(e[k], 4) for k in ("iteration", "val_loss", "val_accuracy", "val_margin") if e.get(k) is not None}
            for e in vals
        ],
        "held_out": [
            {"model": s["name"], "accuracy": s["preference"]["accuracy"]}
            for s in evaluation["scores"]
            if s["preference"]
        ],
        "changes": [c for c in evaluation["changes"] if c["metric"] == "preference accuracy"],
        "writing": house_style_writing(model, str(Path(run["run_dir"]) / "adapters")),
    }
    write_row(row, args.out)


if __name__ == "__main__":
    main()
