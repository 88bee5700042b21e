"""Bad input: each a clear error naming the value and the fix, and no run record or folder left behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.helpers import config
from trainer import ConfigError, JobRunner, RunStore


def _write(folder: Path, train: str, valid: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text(train)
    if valid is not None:
        (folder / "valid.jsonl").write_text(valid)
    return folder


GOOD_LINE = json.dumps({"text": "hello world"})


@pytest.mark.parametrize(
    ("overrides", "data_setup", "expected"),
    [
        ({"model": "/no/such/model"}, None, r"model path '/no/such/model' does not exist"),
        ({"model": "NOT_A_MODEL"}, None, r"is not a model folder: it has no config.json"),
        ({}, "missing", r"data folder .* does not exist"),
        ({}, "no_train", r"has no train.jsonl"),
        ({}, "empty", r"train.jsonl is empty"),
        ({}, "malformed", r"train.jsonl line 2 is not valid JSON"),
        ({}, "unknown_format", r"line 1: unknown record format with keys \['input', 'output'\]"),
        ({"batch_size": 8}, "three", r"batch_size=8 is larger than the 3 examples"),
        ({"rank": 0}, None, r"rank: Input should be greater than or equal to 1 \(got 0\)"),
        ({"iters": -5}, None, r"iters: Input should be greater than or equal to 1 \(got -5\)"),
        ({"num_layers": 40}, None, r"num_layers=40 but the model .* has only 4 layers"),
        ({"adapter_dir": "UNDER_A_FILE"}, None, r"adapter_dir .* is not writable"),
        ({"learning_rat": 0.1}, None, r"learning_rat: Extra inputs are not permitted"),
        ({"learning_rate": float("inf")}, None, r"learning_rate: Input should be a finite number"),
        ({"learning_rate": 1e30}, None, r"learning_rate: Input should be less than or equal to 1 \(got 1e\+30\)"),
        ({"alpha": 1e308}, None, r"alpha: Input should be less than or equal to 10000"),
        ({"iters": 2**63}, None, r"iters: Input should be less than or equal to 10000000"),
        ({"seed": 2**32}, None, r"seed: Input should be less than 4294967296"),
        ({"model": "m" * 1_000_000}, None, r"model: String should have at most 4096 characters \(got 'mmm"),
        ({}, "text_not_string", r"line 1: 'text' must be a string, got int"),
        ({}, "bad_messages", r"line 1: messages must be a non-empty list"),
        ({}, "binary", r"train.jsonl line 1 is not UTF-8 text"),
        ({"model": "UNKNOWN_TYPE"}, None, r"model type 'no_such_arch' .* is not one MLX-LM"),
        ({"model": "GARBAGE_CONFIG"}, None, r"config.json is not valid JSON"),
        ({"packing": True, "layerwise": True}, None, r"packing with layerwise=true: .* drop one"),
        ({"packing": True, "num_processes": 2}, None, r"packing with num_processes > 1 is not built"),
        ({"packing": True, "mode": "dpo"}, None, r"mode 'dpo' computes its own loss .* so packing cannot apply"),
    ],
)
async def test_bad_input_is_a_clear_error_and_leaves_no_record(
    tmp_path: Path, fake_model: Path, tiny_data: Path, overrides: dict[str, Any], data_setup: str | None, expected: str
) -> None:
    data = tiny_data
    lines = {
        "empty": "",
        "malformed": GOOD_LINE + "\n{not json\n",
        "unknown_format": json.dumps({"input": "a", "output": "b"}) + "\n",
        "three": "\n".join([GOOD_LINE] * 3) + "\n",
        "text_not_string": json.dumps({"text": 123}) + "\n",
        "bad_messages": json.dumps({"messages": [{"role": "user", "content": 5}]}) + "\n",
    }
    if data_setup == "missing":
        data = tmp_path / "no-data"
    elif data_setup == "no_train":
        data = tmp_path / "empty-folder"
        data.mkdir()
    elif data_setup == "binary":
        data = tmp_path / "data"
        data.mkdir()
        (data / "train.jsonl").write_bytes(bytes(range(128, 256)) * 4 + b"\n")
    elif data_setup is not None:
        data = _write(tmp_path / "data", lines[data_setup])
    if overrides.get("model") == "NOT_A_MODEL":
        not_model = tmp_path / "not-a-model"
        not_model.mkdir()
        overrides = {**overrides, "model": str(not_model)}
    if overrides.get("model") in ("UNKNOWN_TYPE", "GARBAGE_CONFIG"):
        odd = tmp_path / "odd-model"
        odd.mkdir()
        (odd / "model.safetensors").write_bytes(b"")
        text = '{"model_type": "no_such_arch"}' if overrides["model"] == "UNKNOWN_TYPE" else "\x00garbage{"
        (odd / "config.json").write_text(text)
        overrides = {**overrides, "model": str(odd)}
    if overrides.get("adapter_dir") == "UNDER_A_FILE":
        a_file = tmp_path / "a-file"
        a_file.write_text("x")
        overrides = {**overrides, "adapter_dir": str(a_file / "adapters")}
    home = tmp_path / "home"
    async with JobRunner(RunStore(home)) as runner:
        with pytest.raises(ConfigError, match=expected):
            await runner.submit(config(fake_model, data, **overrides))
    assert RunStore(home).list_runs() == []
    assert list((home / "runs").iterdir()) == []
