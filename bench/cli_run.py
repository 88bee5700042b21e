"""A run through the product's CLI (`python -m trainer run`) in a fresh runs folder, as the CPU gain benchmarks
start theirs, and a result row appended to a JSON-lines file."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def train_through_cli(config: dict[str, Any], prefix: str) -> tuple[dict[str, Any], float, list[str]]:
    """(the finished run's JSON, seconds, the `trainer` command with its --home for further calls)."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    (home / "config.json").write_text(json.dumps(config), encoding="utf-8")
    trainer = [sys.executable, "-m", "trainer", "--home", str(home)]
    start = time.perf_counter()
    ran = subprocess.run([*trainer, "run", str(home / "config.json")], capture_output=True, text=True)
    if ran.returncode != 0:
        sys.exit(ran.stderr[-3000:])
    return json.loads(ran.stdout), time.perf_counter() - start, trainer


def write_row(row: dict[str, Any], out: str | None) -> None:
    line = json.dumps(row)
    print(line)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
