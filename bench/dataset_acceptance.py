"""How long `start_qlora_run` takes to accept a large dataset, through the product's own path (a real server over MCP
stdio, the tiny model's tokenizer and chat template), side by side with the same acceptance at an earlier commit
(`--compare REF`: its `prepare_run` in a subprocess from a git worktree), on the same generated data.

uv run python bench/dataset_acceptance.py [--mb 200] [--compare ef29841] [--out bench/results/acceptance.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from mcp import Client, StdioServerParameters
from trainer.engine.tiny import build_tiny_model

REPO = Path(__file__).resolve().parent.parent
WORDS = "def return import class self value list dict for while if else print lambda yield with open".split()


def write_dataset(folder: Path, megabytes: float) -> int:
    """Chat records of 60-2,400 characters, seeded: the same file every time."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    records = size = 0
    with (folder / "train.jsonl").open("w") as f:
        while size < megabytes * 1e6:
            ask = " ".join(rng.choices(WORDS, k=rng.randint(10, 80)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(50, 400)))
            line = json.dumps(
                {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]}
            )
            f.write(line + "\n")
            size += len(line) + 1
            records += 1
    return records


async def product(home: Path, model: Path, data: Path) -> tuple[float, int]:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_local", "--home", str(home), "--root", str(data.parent), "--log-level", "ERROR"],
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO / "src")},
    )
    notes: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        notes.append(progress)

    async with Client(params, mode="legacy") as client:
        await client.call_tool("list_runs", {})
        config = {"model": str(model), "data": str(data), "num_layers": 4, "iters": 1, "allow_over_budget": True}
        tic = time.perf_counter()
        started = await client.call_tool("start_qlora_run", {"config": config}, progress_callback=on_progress)
        seconds = time.perf_counter() - tic
        assert not started.is_error, started.content
        await client.call_tool("cancel_run", {"run_id": started.structured_content["run_id"]})  # type: ignore[index]
    return seconds, len(notes)


def earlier(ref: str, model: Path, data: Path) -> float:
    tree = Path(tempfile.mkdtemp()) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=REPO, check=True, capture_output=True)
    try:
        code = (
            "import time; from trainer.planning.preflight import prepare_run, RunDefaults;"
            "from trainer.planning.config import QLoRAConfig;"
            f"c = QLoRAConfig.parse({{'model': {str(model)!r}, 'data': {str(data)!r}, 'num_layers': 4,"
            "'allow_over_budget': True}); t = time.perf_counter(); prepare_run(c, RunDefaults());"
            "print(time.perf_counter() - t)"
        )
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return float(done.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=200)
    parser.add_argument("--compare", help="a commit whose prepare_run to time on the same data")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="acceptance-"))
    model = build_tiny_model(work / "model")
    records = write_dataset(work / "data", args.mb)
    seconds, notes = anyio.run(product, work / "home", model, work / "data")
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "megabytes": args.mb, "records": records,
        "product_start_qlora_run_s": round(seconds, 1), "progress_notifications": notes,
    }  # fmt: skip
    if args.compare:
        result[f"prepare_run_at_{args.compare}_s"] = round(earlier(args.compare, model, work / "data"), 1)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
