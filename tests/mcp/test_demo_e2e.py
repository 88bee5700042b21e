"""README command 1 in short: the demo drives the real server over stdio to fine-tune the real SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_fine_tunes_smollm2_and_the_tuned_model_follows_the_house_style(tmp_path: Path) -> None:
    summary_file = tmp_path / "summary.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mcp_local_demo",
            "--iters",
            "24",
            "--eval-prompts",
            "3",
            "--max-tokens",
            "80",
            "--humaneval",
            "2",
            "--home",
            str(tmp_path / "home"),
            "--json",
            str(summary_file),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    assert summary["last_val_loss"] < 0.5 * summary["first_val_loss"]
    assert summary["tuned_score"] > summary["base_score"]
    assert 0 <= summary["base_pass_at_1"] <= 1 and 0 <= summary["tuned_pass_at_1"] <= 1  # printed next to the style
    assert summary["tuned_score"] >= 0.8
    assert (Path(summary["adapter"]) / "adapters.safetensors").is_file()
    assert (Path(summary["run_dir"]) / "plot.png").read_bytes().startswith(b"\x89PNG")  # the run's picture beside it
    assert "base vs tuned" in result.stdout
    # no terminal here (captured, as in a log or CI): a plain progress line per run_status answer, never cut
    progress = [line for line in result.stdout.splitlines() if line.startswith("training ")]
    assert len(progress) >= 2 and progress[-1].startswith("training 24/24"), result.stdout[-2000:]
