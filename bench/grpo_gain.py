"""grpo on the bundled real model, through the product's own path: `python -m trainer run` with mode grpo on the
bundled Python tasks (30 train, 6 valid), then the 12 held-out tasks answered greedily by base and adapter (the
product's generate path) and scored by their asserts in the sandbox: the share of tests passed and of tasks passed
whole, base -> adapter with the paired 95% interval over tasks.

python3 bench/grpo_gain.py [--iters 60] [--generations 4] [--learning-rate 1e-4] [--temperature 0.7]
    [--out results.jsonl]
python3 bench/grpo_gain.py --adapter RUN/adapters   (only the held-out check, for a run already trained)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

MAX_TOKENS = 160


def held_out(model: Path, adapter: str) -> dict[str, object]:
    from mcp_local_demo.bundled import python_tasks
    from trainer.engine.inference import ModelSession
    from trainer.planning.task_records import parse_tests
    from trainer.results.intervals import paired_change
    from trainer.results.test_rewards import score_completions

    records = [json.loads(line) for line in (python_tasks() / "test.jsonl").read_text().splitlines() if line]
    suites = [parse_tests(r["tests"]) for r in records]
    session = ModelSession()
    shares: dict[str, list[float]] = {}
    whole: dict[str, list[float]] = {}
    replies: dict[str, list[str]] = {}
    for name, with_adapter in (("base", None), ("adapter", adapter)):
        texts = [
            session.generate(r["prompt"], max_tokens=MAX_TOKENS, model=str(model), adapter=with_adapter).text
            for r in records
        ]
        scores = score_completions(texts, suites)
        shares[name] = [s.reward() for s in scores]
        whole[name] = [float(s.all_passed) for s in scores]
        replies[name] = texts
    ones = [1.0] * len(records)
    return {
        "tests_passed": paired_change(
            "share of tests passed", (shares["base"], ones), (shares["adapter"], ones), higher_is_better=True
        ).model_dump(),
        "tasks_passed": paired_change(
            "tasks passed whole", (whole["base"], ones), (whole["adapter"], ones), higher_is_better=True
        ).model_dump(),
        "first_replies": {k: v[:2] for k, v in replies.items()},
    }


def main() -> None:
    from trainer.environment.preload import reexec_with_preloads

    reexec_with_preloads()  # OpenBLAS under MLX, as the product's own processes run
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--out", default=None)
    parser.add_argument("--adapter", default=None, help="only the held-out check, for this adapter")
    args = parser.parse_args()
    from cli_run import train_through_cli, write_row

    from mcp_local_demo.bundled import python_tasks, smollm2_gguf
    from trainer.engine.gguf import cached_import

    model = cached_import(smollm2_gguf(), Path("demo-output") / "models")
    if args.adapter:
        print(json.dumps({"adapter": args.adapter, **held_out(model, args.adapter)}))
        return
    config = {
        "model": str(model),
        "data": str(python_tasks()),
        "mode": "grpo",
        "beta": args.beta,
        "generations": args.generations,
        "temperature": args.temperature,
        "completion_tokens": MAX_TOKENS,
        "iters": args.iters,
        "batch_size": 2,
        "learning_rate": args.learning_rate,
        "max_seq_length": 512,
        "steps_per_report": 5,
        "steps_per_eval": 20,
        "val_batches": -1,
        "save_every": 20,
    }
    run, train_s, _ = train_through_cli(config, "grpo-home-")
    events = [json.loads(line) for line in Path(run["run_dir"], "events.jsonl").read_text().splitlines()]
    keep = ("iteration", "train_loss", "reward", "pass_rate", "kl", "completion_tokens", "val_reward", "val_pass_rate")
    row = {
        "iters": args.iters,
        "generations": args.generations,
        "learning_rate": args.learning_rate,
        "beta": args.beta,
        "temperature": args.temperature,
        "run_dir": run["run_dir"],
        "train_seconds": round(train_s, 1),
        "peak_gb": run["metrics"]["peak_memory_gb"],
        "predicted_gb": run["metrics"]["predicted_peak_gb"],
        "curve": [
            {k: round(e[k], 4) for k in keep if e.get(k) is not None}
            for e in events
            if e["type"] in ("train_report", "val_report")
        ],
        "held_out": held_out(model, str(Path(run["run_dir"]) / "adapters")),
    }
    write_row(row, args.out)


if __name__ == "__main__":
    main()
