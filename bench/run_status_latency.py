"""run_status latency over real stdio while a run trains: p50/p99 of N calls.

uv run python bench/run_status_latency.py [--calls 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

from mcp import Client, StdioServerParameters
from trainer.engine.tiny import build_tiny_model, write_synthetic_dataset


async def main(calls: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model")
        data = write_synthetic_dataset(root / "data")
        params = StdioServerParameters(
            command=sys.executable,
            args=["-m", "mcp_local", "--home", str(root / "home"), "--log-level", "WARNING"],
            env={"PATH": os.environ.get("PATH", "")},
        )
        async with Client(params, mode="legacy") as client:
            config = {
                "model": str(model),
                "data": str(data),
                "num_layers": 4,
                "iters": 100_000,
                "batch_size": 4,
                "learning_rate": 1e-3,
                "max_seq_length": 128,
                "steps_per_report": 5,
                "steps_per_eval": 1000,
            }
            run_id = (await client.call_tool("start_qlora_run", {"config": config})).structured_content["run_id"]
            status = {"iteration": 0}
            while status["iteration"] < 5:
                args = {"run_id": run_id, "wait_seconds": 5}
                status = (await client.call_tool("run_status", args)).structured_content
            latencies = []
            for _ in range(calls):
                start = time.perf_counter()
                result = await client.call_tool("run_status", {"run_id": run_id})
                latencies.append((time.perf_counter() - start) * 1000)
                assert result.structured_content["state"] == "running"
            final = (await client.call_tool("run_status", {"run_id": run_id})).structured_content["iteration"]
            await client.call_tool("cancel_run", {"run_id": run_id})
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(
        f"run_status over stdio while training (iteration reached {final}): {calls} calls, "
        f"p50 {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    anyio.run(main, parser.parse_args().calls)
