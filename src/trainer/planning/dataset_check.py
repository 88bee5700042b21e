"""Checks a training data folder before a run is accepted, so bad data fails in milliseconds with a line number."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

FORMATS = {
    "chat": ("messages",),
    "completions": ("prompt", "completion"),
    "text": ("text",),
}


@dataclass(frozen=True)
class DatasetSummary:
    format: str
    train_examples: int
    valid_examples: int


def _record_format(record: object, where: str) -> str:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
    for name, keys in FORMATS.items():
        if all(k in record for k in keys):
            return name
    raise ConfigError(
        f"{where}: unknown record format with keys {sorted(record)}; use "
        '{"messages": [{"role": ..., "content": ...}]}, {"prompt": ..., "completion": ...} or {"text": ...}'
    )


def _check_file(path: Path) -> tuple[str | None, int]:
    fmt: str | None = None
    count = 0
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where} is not valid JSON ({exc.msg}); fix or remove that line") from None
            line_fmt = _record_format(record, where)
            if fmt is None:
                fmt = line_fmt
            elif line_fmt != fmt:
                raise ConfigError(f"{where} is a {line_fmt} record but earlier lines are {fmt}; use one format")
            count += 1
    return fmt, count


def check_dataset(data: str, batch_size: int) -> DatasetSummary:
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"data folder {data!r} does not exist; pass a folder holding train.jsonl (and valid.jsonl)")
    train = folder / "train.jsonl"
    if not train.is_file():
        raise ConfigError(f"data folder {data!r} has no train.jsonl; put the training examples there, one per line")
    fmt, n_train = _check_file(train)
    if n_train == 0 or fmt is None:
        raise ConfigError(f"{train} is empty; it needs at least batch_size={batch_size} examples")
    if n_train < batch_size:
        raise ConfigError(
            f"batch_size={batch_size} is larger than the {n_train} examples in {train}; "
            f"lower batch_size to at most {n_train} or add examples"
        )
    n_valid = 0
    valid = folder / "valid.jsonl"
    if valid.is_file():
        valid_fmt, n_valid = _check_file(valid)
        if n_valid and valid_fmt != fmt:
            raise ConfigError(f"{valid} holds {valid_fmt} records but train.jsonl holds {fmt}; use one format")
        if 0 < n_valid < batch_size:
            raise ConfigError(
                f"batch_size={batch_size} is larger than the {n_valid} examples in {valid}; "
                f"lower batch_size or add validation examples"
            )
    return DatasetSummary(format=fmt, train_examples=n_train, valid_examples=n_valid)
