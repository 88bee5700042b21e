"""Turning what a user calls a model (a folder today) into a checked local folder, without loading weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConfigError


def resolve_model_dir(ref: str) -> Path:
    """Return the local model folder for `ref`, or raise a ConfigError that says what is wrong and how to fix it."""
    path = Path(ref).expanduser()
    if not path.exists():
        raise ConfigError(f"model path {ref!r} does not exist; pass a local model folder (with config.json)")
    if not path.is_dir():
        raise ConfigError(f"model path {ref!r} is a file, not a model folder; pass the folder that holds config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{ref!r} is not a model folder: it has no config.json")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"{ref!r} is not a model folder: it has no *.safetensors weights")
    return path.resolve()


def read_model_config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{model_dir}/config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"{model_dir}/config.json has no model_type, so it is not a model config")
    return config


def num_hidden_layers(config: dict[str, Any]) -> int | None:
    value = config.get("num_hidden_layers", config.get("text_config", {}).get("num_hidden_layers"))
    return int(value) if value is not None else None
