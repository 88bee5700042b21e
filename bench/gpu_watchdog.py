"""Does the memory watchdog stop a run in its training steps on this device? A real worker trains the tiny model
(random weights, built here) with a budget its steps pass at once; the run should stop at the next step with kind
`memory_budget`, not train every step (on CUDA it once did: docs/benchmarks.md, twenty-third session).

python3 bench/gpu_watchdog.py --work DIR [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).parent))

from memory_prediction import report  # noqa: E402

from trainer import JobRunner, RunStore  # noqa: E402
from trainer.engine.tiny import build_tiny_model, write_synthetic_dataset  # noqa: E402

ITERS = 400


async def check(work: Path, out: str | None) -> None:
    model = build_tiny_model(work / "model")
    data = work / "data"
    write_synthetic_dataset(data)
    (data / "valid.jsonl").unlink()  # no validation: the budget is passed in the training steps
    async with JobRunner(RunStore(work / "home")) as runner:
        config = {"model": str(model), "data": str(data), "num_layers": 4, "iters": ITERS, "batch_size": 4}
        config.update(max_seq_length=128, memory_sample_interval=0.05, memory_budget_gb=0.005, allow_over_budget=True)
        done = await runner.wait_until_done((await runner.submit(config)).id, 600)
    error = done.error.message if done.error else ""
    report(
        {
            "check": "watchdog stops the training steps",
            "state": done.state.value,
            "kind": done.error.kind.value if done.error else None,
            "iteration": done.iteration,
            "iters": ITERS,
            "phase": done.phase.value if done.phase else None,
            "stopped_in_the_steps": done.iteration < ITERS and "every step was done" not in error,
            "error": error[:300],
        },
        out,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    anyio.run(check, Path(args.work), args.out)


if __name__ == "__main__":
    main()
