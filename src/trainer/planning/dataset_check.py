"""Checks a training data folder before a run is accepted, so bad data fails in milliseconds with a line number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from .preference_records import check_record, completion_text, is_preference, prompt_messages
from .task_records import check_task, is_task

FORMATS = {  # the first whose keys a record has is its format (a preference record may hold "messages" too)
    "preference": ("chosen", "rejected"),
    "tests": ("tests",),
    "chat": ("messages",),
    "completions": ("prompt", "completion"),
    "text": ("text",),
}


#: a longer line is refused as not an example (a whole dataset on one line, a binary file)
MAX_LINE_BYTES = 8 * 1024 * 1024
#: tokens a chat template adds per message, and for a system prompt and markers
TEMPLATE_TOKENS_PER_MESSAGE = 8
TEMPLATE_TOKENS = 40


class DatasetSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    format: str
    train_examples: int
    valid_examples: int
    longest_tokens: int | None = Field(
        None, description="Tokens of the longest example with its template (None: the model has no tokenizer.json)."
    )
    length_sample: list[int] = Field(
        default_factory=list, description="Training examples' tokens at evenly spaced quantiles (at most 128), sorted."
    )


class _TokenCounter:
    """Counts an example's tokens with the model's tokenizer.json, as the training set will see them."""

    def __init__(self, tokenizer_file: Path | None) -> None:
        self.longest: int | None = None
        self._tokenizer = None
        if tokenizer_file is not None and tokenizer_file.is_file():
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
            self.longest = 0
        self.counts: list[int] = []

    def add(self, record: dict[str, Any]) -> None:
        if self._tokenizer is None or self.longest is None:
            return
        if is_preference(record):  # the prompt and the longer reply: a pair's longest sequence
            replies = sorted((completion_text(record[k]) for k in ("chosen", "rejected")), key=len)
            texts = [m["content"] for m in prompt_messages(record)] + replies[-1:]
        elif is_task(record):  # the prompt only: the run adds up to completion_tokens to it
            texts = [m["content"] for m in prompt_messages(record)]
        elif messages := record.get("messages"):
            texts = [str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in messages]
        else:
            texts = [str(v) for v in record.values() if isinstance(v, str)]
        count = sum(len(self._tokenizer.encode(t).ids) for t in texts)
        count += TEMPLATE_TOKENS_PER_MESSAGE * len(texts) + TEMPLATE_TOKENS
        self.longest = max(self.longest, count)
        self.counts.append(count)


def quantile_sample(values: list[int], size: int = 128) -> list[int]:
    """The values at `size` evenly spaced quantiles (all of them when fewer), sorted: the length distribution the plan
    search predicts speeds on."""
    ordered = sorted(values)
    if len(ordered) <= size:
        return ordered
    return [ordered[round(i * (len(ordered) - 1) / (size - 1))] for i in range(size)]


def _record_format(record: object, where: str) -> str:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
    for name, keys in FORMATS.items():
        if all(k in record for k in keys):
            _check_values(name, record, where)
            return name
    raise ConfigError(
        f"{where}: unknown record format with keys {sorted(record)}; use "
        '{"messages": [{"role": ..., "content": ...}]}, {"prompt": ..., "completion": ...} or {"text": ...} '
        '(or {"prompt": ..., "chosen": ..., "rejected": ...} for mode dpo or orpo, {"prompt": ..., "tests": ...} '
        "for grpo)"
    )


def _check_values(fmt: str, record: dict[str, Any], where: str) -> None:
    """The fields MLX-LM reads must be text (a number or a list there fails only in the worker, minutes later)."""
    if fmt in ("preference", "tests"):
        try:
            (check_record if fmt == "preference" else check_task)(record)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return
    if fmt == "chat":
        messages = record["messages"]
        ok = (
            isinstance(messages, list)
            and bool(messages)
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok:
            raise ConfigError(f'{where}: messages must be a non-empty list of {{"role": str, "content": str}} objects')
        return
    for key in FORMATS[fmt]:
        if not isinstance(record[key], str):
            raise ConfigError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")


def _check_file(path: Path, counter: _TokenCounter) -> tuple[str | None, int]:
    fmt: str | None = None
    count = 0
    with path.open("rb") as raw_lines:
        for number, raw in enumerate(raw_lines, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise ConfigError(
                    f"{path} line {number} is {len(raw) / 1e6:.0f} MB, longer than the {MAX_LINE_BYTES // 2**20} MiB "
                    "an example may take; put one example per line"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{path} line {number} is not UTF-8 text; a dataset is JSON lines") from None
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where} is not valid JSON ({exc.msg}); fix or remove that line") from None
            line_fmt = _record_format(record, where)
            counter.add(record)
            if fmt is None:
                fmt = line_fmt
            elif line_fmt != fmt:
                raise ConfigError(f"{where} is a {line_fmt} record but earlier lines are {fmt}; use one format")
            count += 1
    return fmt, count


def data_files(data: str) -> tuple[Path, Path]:
    """train.jsonl and valid.jsonl of a data folder, or a ConfigError saying what is missing."""
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"data folder {data!r} does not exist; pass a folder holding train.jsonl (and valid.jsonl)")
    train = folder / "train.jsonl"
    if not train.is_file():
        raise ConfigError(f"data folder {data!r} has no train.jsonl; put the training examples there, one per line")
    return train, folder / "valid.jsonl"


def check_size(data: str, max_mb: float | None) -> None:
    train, valid = data_files(data)
    size_mb = sum(path.stat().st_size for path in (train, valid) if path.is_file()) / 1e6
    if max_mb is not None and size_mb > max_mb:
        raise ConfigError(
            f"the dataset in {data!r} is {size_mb:.0f} MB, over the server's limit of {max_mb:.0f} MB "
            "(--max-dataset-mb raises it)"
        )


def check_counts(data: str, batch_size: int, n_train: int, n_valid: int) -> None:
    """Enough examples for one batch, in train and (when it has any) valid."""
    train, valid = data_files(data)
    if n_train == 0:
        raise ConfigError(f"{train} is empty; it needs at least batch_size={batch_size} examples")
    if n_train < batch_size:
        raise ConfigError(
            f"batch_size={batch_size} is larger than the {n_train} examples in {train}; "
            f"lower batch_size to at most {n_train} or add examples"
        )
    if 0 < n_valid < batch_size:
        raise ConfigError(
            f"batch_size={batch_size} is larger than the {n_valid} examples in {valid}; "
            f"lower batch_size or add validation examples"
        )


def check_dataset(
    data: str, batch_size: int, tokenizer_file: Path | None = None, max_mb: float | None = None
) -> DatasetSummary:
    """Read the data folder once: check every record, count examples and (with a tokenizer) the longest one. The
    preflight uses this only for a model without tokenizer.json (dataset_report.py reads it with the tokenizer)."""
    train, valid = data_files(data)
    check_size(data, max_mb)
    counter = _TokenCounter(tokenizer_file)
    fmt, n_train = _check_file(train, counter)
    sample = quantile_sample(counter.counts)
    n_valid = 0
    if valid.is_file():
        valid_fmt, n_valid = _check_file(valid, counter)
        if n_valid and fmt is not None and valid_fmt != fmt:
            raise ConfigError(f"{valid} holds {valid_fmt} records but train.jsonl holds {fmt}; use one format")
    check_counts(data, batch_size, n_train, n_valid)
    assert fmt is not None
    return DatasetSummary(
        format=fmt, train_examples=n_train, valid_examples=n_valid, longest_tokens=counter.longest, length_sample=sample
    )
