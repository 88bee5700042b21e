"""The second demo scenario (`scripts/demo --repo`): tune the bundled SmolLM2 on a real code base and show, base vs
tuned, what changed on files the run never saw. The code base is `toolz` 1.2.0 (BSD-3-Clause), fetched from PyPI as
its sdist and checked against its pinned SHA-256; everything goes through the MCP server in three tool calls:
build_dataset (instruct: docstring -> body), start_qlora_run, evaluate (held-out perplexity and function completion,
each with a 95% bootstrap interval)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from rich.table import Table

from mcp import Client, StdioServerParameters

from .client import DemoError, console, follow_run, structured

SDIST = "toolz"
VERSION = "1.2.0"
SHA256 = "9667a038e9d6ecba37995e26cb2f59ec6420b6ad8dd9677de59db9b956b08490"


def fetch_sdist(into: Path) -> Path:
    """The sdist's source folder under `into` (downloaded once, checked against SHA256, unpacked safely)."""
    folder = into / f"{SDIST}-{VERSION}"
    if folder.is_dir():
        return folder
    index = urllib.request.Request(  # PyPI's simple API, as JSON (PEP 691)
        f"https://pypi.org/simple/{SDIST}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(index, timeout=60) as answer:
        files = json.load(answer)["files"]
    url = next(f["url"] for f in files if f["filename"] == f"{SDIST}-{VERSION}.tar.gz")
    with urllib.request.urlopen(url, timeout=120) as answer:
        blob = answer.read()
    if hashlib.sha256(blob).hexdigest() != SHA256:
        raise DemoError(f"{url} does not have the pinned SHA-256 {SHA256}; not using it")
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into) as staging, tarfile.open(fileobj=io.BytesIO(blob)) as archive:
        archive.extractall(staging, filter="data")
        (Path(staging) / folder.name).rename(folder)
    return folder


def prepare(args: argparse.Namespace) -> None:
    """Before the event loop: the code base fetched, and the folder of the model the server may read."""
    args.source = fetch_sdist(args.home.resolve() / "repos")
    model = Path(args.model).resolve()
    args.model_root = model if model.is_dir() else model.parent


def _config(model: str, data: Path, iters: int) -> dict[str, Any]:
    return {
        "model": model, "data": str(data), "iters": iters, "batch_size": 4, "learning_rate": 1e-4, "num_layers": -1,
        "mask_prompt": True, "max_seq_length": 512, "steps_per_report": 5, "steps_per_eval": max(iters // 2, 1),
        "val_batches": -1, "save_every": iters,
    }  # fmt: skip


def _table(evaluation: dict[str, Any]) -> Table:
    table = Table(title=f"held-out {SDIST} {VERSION} code, base vs tuned (95% bootstrap intervals)")
    for column in ("figure", "base", "tuned", "change", "verdict"):
        table.add_column(column, justify="left" if column in ("figure", "verdict") else "right")

    def interval(value: dict[str, float]) -> str:
        return f"{value['value']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"

    base, tuned = evaluation["scores"]
    figures = {
        "held-out perplexity": ("held_out", "perplexity"),
        "held-out loss": ("held_out", "loss"),
        "similarity": ("completion", "similarity"),
        "exact match": ("completion", "exact_match"),
    }
    for change in evaluation["changes"]:
        part, key = figures.get(change["metric"], ("completion", "tests_passed"))
        table.add_row(
            change["metric"], interval(base[part][key]), interval(tuned[part][key]), interval(change["difference"]),
            change["verdict"],
        )  # fmt: skip
    return table


async def run_repo_demo(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    home = args.home.resolve()
    console.rule(f"[bold]mcp-local demo: tune on a repository ({SDIST} {VERSION} from PyPI)")
    source, model_root = args.source, args.model_root
    out = home / "datasets" / f"{SDIST}-instruct-{time.strftime('%Y%m%d-%H%M%S')}"
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_local", "--home", str(home), "--sample-interval", "0.5", "--log-level", "WARNING",
              "--root", str(home), "--root", str(model_root)],
    )  # fmt: skip
    async with Client(params, mode="legacy") as client:
        built = await client.call_tool(
            "build_dataset", {"source": str(source), "out": str(out), "format": "instruct", "model": args.model}
        )
        report = structured(built, "build_dataset")
        console.print(built.content[0].text.split("\n", 1)[0])  # type: ignore[union-attr]
        run = structured(
            await client.call_tool("start_qlora_run", {"config": _config(args.model, out, args.iters)}),
            "start_qlora_run",
        )
        status = await follow_run(client, run["run_id"], args.iters)
        if status["state"] != "succeeded":
            raise DemoError(f"run {run['run_id']} ended {status['state']}: {status['error']}")
        console.rule("evaluating base and tuned on the held-out files")
        while True:  # evaluate answers within its wait; call again to follow
            state = structured(await client.call_tool("evaluate", {"run_id": run["run_id"], "humaneval_limit": 0}),
                                "evaluate")  # fmt: skip
            console.print(f"  {state['done']} of {state['total']} done")
            if state["state"] != "running":
                break
    if state["state"] != "succeeded":
        raise DemoError(f"the evaluation failed: {state['error']}")
    evaluation = state["evaluation"]
    console.print(_table(evaluation))
    test = next(s for s in report["splits"] if s["split"] == "test")
    console.print(f"held out: {test['files']} files, {test['records']} functions; wall time "
                  f"{time.monotonic() - started:.0f} s; evaluation.json in {status['run_dir']}")  # fmt: skip
    return {"run_id": run["run_id"], "wall_seconds": round(time.monotonic() - started, 1), "report": report,
            "evaluation": evaluation, "metrics": status["metrics"]}  # fmt: skip
