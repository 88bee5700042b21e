from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trainer.engine.tiny import build_tiny_model, write_synthetic_dataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qwen2 model with random weights and a BPE tokenizer trained on text in this repo (about a second)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    """Enough of a model folder to pass the checks; only the fake backend ever 'loads' it."""
    folder = tmp_path / "fake-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": 4}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def tiny_run_config(model: Path, data: Path, /, **overrides: Any) -> dict[str, Any]:
    """A QLoRA config that visibly trains the tiny model on the synthetic data in a few seconds."""
    base: dict[str, Any] = {
        "model": str(model),
        "data": str(data),
        "num_layers": 4,
        "iters": 40,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "max_seq_length": 128,
        "steps_per_report": 5,
        "steps_per_eval": 20,
        "val_batches": 5,
    }
    return {**base, **overrides}


def user_namespaces() -> bool:
    """Whether `unshare -Urm` works here (for tests that mount a small or read-only filesystem). Run without
    LD_PRELOAD: a preloaded OpenBLAS starts threads, and a threaded process cannot enter a new user namespace."""
    import os
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return subprocess.run(["unshare", "-Urm", "true"], env=env, check=False).returncode == 0
