"""A budget passed during the training steps stops the run at the next step (a real MLX run in a real worker)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import tiny_run_config
from trainer import JobRunner, JobState, RunStore

pytestmark = pytest.mark.slow


async def test_the_watchdog_stops_a_run_whose_training_steps_pass_its_budget(tmp_path: Path, tiny_model: Path) -> None:
    rng = random.Random(0)
    words = "def return value list index count total result items adding write".split()
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) for _ in range(16)]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    async with JobRunner(RunStore(tmp_path / "home")) as runner:
        config = tiny_run_config(tiny_model, data, iters=400, memory_sample_interval=0.05)
        config.update(memory_budget_gb=0.005, allow_over_budget=True)
        done = await runner.wait_until_done((await runner.submit(config)).id, 300)
    assert done.state is JobState.FAILED and done.error and done.error.kind.value == "memory_budget", done
    assert "every step was done" not in done.error.message, done.error.message
    assert done.iteration < 400 and done.phase is not None and done.phase.value == "training", done
