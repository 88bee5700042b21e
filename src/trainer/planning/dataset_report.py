"""Every line of a dataset checked with the model's own tokenizer and chat template, before a long run.

Unlike the quick check a run's preflight always makes (dataset_check.py: the first problem stops it), this reads
train, valid and test to the end and lists every problem with its file, line and reason, plus what the run will see:
token lengths (percentiles), how many examples `max_seq_length` truncates and how many tokens the loss trains on
with `mask_prompt`. Token counts follow MLX-LM's own dataset classes (mlx_lm/tuner/datasets.py: the chat template
over `messages`, a user/assistant pair for prompt/completion, text plus EOS), through transformers' tokenizer, which
MLX-LM loads the same way; no MLX is imported.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from .dataset_check import FORMATS, MAX_LINE_BYTES, DatasetSummary, check_counts, quantile_sample
from .modelref import resolve_model_dir
from .paths import PathPolicy
from .preference_records import check_record, completion_text, prompt_messages
from .repo_files import may_hold_secret, secret_in_line
from .task_records import check_task

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")
ProblemKind = Literal[
    "encoding", "json", "format", "roles", "template", "secret", "empty", "too_long", "duplicate"
]  # fmt: skip
#: problems that would stop a run; the others (empty messages, unusual roles, truncation, duplicates) are warnings
ERRORS = frozenset({"encoding", "json", "format", "roles", "template", "secret"})
#: problems listed in full (the counts cover them all)
MAX_LISTED = 50
ROLES = frozenset({"system", "user", "assistant", "tool"})
#: records tokenized at a time (one call into the Rust tokenizer, which spreads a batch over the cores)
BATCH = 512


class DatasetProblem(BaseModel):
    model_config = ConfigDict(frozen=True)

    file: str
    line: int
    kind: ProblemKind
    message: str


class SplitSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    split: str
    examples: int
    tokens_p50: int | None = None
    tokens_p90: int | None = None
    tokens_max: int | None = None
    truncated: int = Field(0, description="Examples longer than max_seq_length (cut to it).")
    length_sample: list[int] = Field(default_factory=list, exclude=True)  # for the plan search (dataset_check)
    tokens_total: int = 0
    tokens_trained: int = Field(0, description="Tokens the loss covers (with mask_prompt: the completions only).")


class DatasetReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    data: str
    format: str | None
    max_seq_length: int
    mask_prompt: bool
    splits: list[SplitSummary]
    errors: int
    warnings: int
    problem_counts: dict[str, int]
    problems: list[DatasetProblem] = Field(description=f"The first {MAX_LISTED}, errors before warnings.")

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def summary(self) -> str:
        parts = [f"{s.split} {s.examples}" for s in self.splits]
        train = next((s for s in self.splits if s.split == "train"), None)
        if train and train.tokens_max is not None:
            parts.append(
                f"train tokens p50 {train.tokens_p50} / p90 {train.tokens_p90} / max {train.tokens_max}, "
                f"{train.truncated} over {self.max_seq_length}, {train.tokens_trained} trained on"
            )
        verdict = "ok" if self.ok else f"{self.errors} error(s)"
        return f"{self.data}: {verdict}, {self.warnings} warning(s); " + "; ".join(parts)


class _Tokens:
    """(tokens, offset) per record as MLX-LM's datasets compute them; None without a tokenizer. The templates are
    rendered one record at a time (a template may fail on one), the texts tokenized a batch at a time by the Rust
    tokenizer (in parallel): the same ids as `apply_chat_template(tokenize=True)` and `encode`, several times faster."""

    def __init__(self, model_dir: Path | None) -> None:
        self.tokenizer: Any = None
        if model_dir is not None and (model_dir / "tokenizer.json").is_file():
            from ..first_import import attribute_once

            auto_tokenizer = attribute_once("transformers", "AutoTokenizer")  # not MLX: what mlx_lm.load uses
            self.tokenizer = auto_tokenizer.from_pretrained(str(model_dir))

    def render(self, fmt: str, record: dict[str, Any], mask_prompt: bool) -> tuple[str, str | None]:
        """The text the run tokenizes and, with mask_prompt, its prompt part (raises what the template raises)."""
        tok = self.tokenizer
        if fmt == "text":
            return record["text"], None
        if fmt == "preference":  # the prompt and the longer reply (a pair's longest sequence); its prompt is masked
            replies = sorted((completion_text(record[k]) for k in ("chosen", "rejected")), key=len)
            prompt_turns = prompt_messages(record)
            full = tok.apply_chat_template(
                [*prompt_turns, {"role": "assistant", "content": replies[-1]}], tokenize=False
            )
            return str(full), str(tok.apply_chat_template(prompt_turns, add_generation_prompt=True, tokenize=False))
        if fmt == "tests":  # the prompt as the run samples from it (its completions are the run's own)
            prompt = str(tok.apply_chat_template(prompt_messages(record), add_generation_prompt=True, tokenize=False))
            return prompt, prompt if mask_prompt else None
        if fmt == "chat":
            messages = record["messages"]
        else:
            messages = [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]},
            ]
        tools = record.get("tools")
        full = str(tok.apply_chat_template(messages, tools=tools, tokenize=False))
        if not mask_prompt:
            return full, None
        generation_prompt = fmt != "chat" or messages[-1].get("role") == "assistant"
        prompt = tok.apply_chat_template(
            messages[:-1], tools=tools, add_generation_prompt=generation_prompt, tokenize=False
        )
        return full, str(prompt)

    def count_batch(self, fmt: str, rendered: list[tuple[str, str | None]]) -> list[tuple[int, int]]:
        backend = self.tokenizer.backend_tokenizer
        special = fmt == "text"  # mlx-lm encodes text with special tokens; a rendered template has them already
        fulls = backend.encode_batch([full for full, _ in rendered], add_special_tokens=special)
        prompts = [p for _, p in rendered if p is not None]
        prompt_lengths = iter(len(e.ids) for e in backend.encode_batch(prompts, add_special_tokens=False))
        counts = []
        for encoding, (_, prompt) in zip(fulls, rendered, strict=True):
            ids = encoding.ids
            total = len(ids)
            if fmt == "text":
                total += 0 if ids and ids[-1] == self.tokenizer.eos_token_id else 1
            counts.append((total, next(prompt_lengths) if prompt is not None else 0))
        return counts


def json_unescaped(line: str) -> str:
    """The line with JSON's string escapes undone (a private key's newlines are `\\n` there), for the scan."""
    return line.replace("\\n", "\n").replace('\\"', '"')


def _format_of(record: object) -> str | None:
    if not isinstance(record, dict):
        return None
    return next((name for name, keys in FORMATS.items() if all(k in record for k in keys)), None)


def _value_problem(fmt: str, record: dict[str, Any]) -> tuple[ProblemKind, str] | None:
    """What stops this record (an error); `_oddity` finds what only weakens it."""
    if fmt in ("preference", "tests"):
        try:
            (check_record if fmt == "preference" else check_task)(record)
        except ValueError as exc:
            return "format", str(exc)
        return None
    if fmt != "chat":
        wrong = [k for k in FORMATS[fmt] if not isinstance(record[k], str)]
        return ("format", f"{wrong[0]!r} must be a string") if wrong else None
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return "roles", "messages is empty; a chat needs at least one message"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return "roles", f"message {index} is not an object"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            return "roles", f"message {index} has no role"
        if not isinstance(content, str):
            return "roles", f"message {index} ({role}) has no content string"
    return None


def _oddity(fmt: str, record: dict[str, Any]) -> str | None:
    if fmt in ("preference", "tests"):  # check_record and check_task have found what matters
        return None
    texts = (
        [(str(m["role"]), m["content"]) for m in record["messages"]]
        if fmt == "chat"
        else [(key, record[key]) for key in FORMATS[fmt]]
    )
    for role, text in texts:
        if fmt == "chat" and role not in ROLES:
            return f"role {role!r} is not one of {sorted(ROLES)}"
        if not text.strip():
            return f"{role} is empty"
    return None


class _Reader:
    """Reads the splits, collecting problems and per-split token counts."""

    def __init__(
        self, tokens: _Tokens, max_seq_length: int, mask_prompt: bool, progress: Callable[[int], None]
    ) -> None:
        self.tokens, self.max_seq_length, self.mask_prompt = tokens, max_seq_length, mask_prompt
        self.progress = progress
        self.bytes_read = 0
        self.problems: list[DatasetProblem] = []
        self.format: str | None = None
        self.seen_in_train: dict[str, int] = {}

    def problem(self, path: Path, line: int, kind: ProblemKind, message: str) -> None:
        self.problems.append(DatasetProblem(file=str(path), line=line, kind=kind, message=message))

    def split(self, name: str, path: Path) -> SplitSummary:
        lengths: list[int] = []
        trained = truncated = 0
        examples = 0
        batch: list[tuple[int, dict[str, Any]]] = []

        def flush() -> None:
            nonlocal trained, truncated
            for number, (total, offset) in self._count(path, batch):
                lengths.append(total)
                kept = min(total, self.max_seq_length)
                trained += max(kept - offset, 0)
                if total > self.max_seq_length:
                    truncated += 1
                    self.problem(
                        path, number, "too_long", f"{total} tokens, cut to max_seq_length={self.max_seq_length}"
                    )
            batch.clear()

        with path.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                self.bytes_read += len(raw)
                record = self._record(path, number, raw)
                if record is None:
                    continue
                examples += 1
                self._duplicate(name, path, number, raw)
                batch.append((number, record))
                if len(batch) >= BATCH:
                    flush()
                    self.progress(self.bytes_read)
        flush()
        ordered = sorted(lengths)

        def pick(q: float) -> int | None:
            return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else None

        return SplitSummary(
            split=name, examples=examples, tokens_p50=pick(0.5), tokens_p90=pick(0.9), tokens_max=pick(1.0),
            truncated=truncated, tokens_total=sum(lengths), tokens_trained=trained,
            length_sample=quantile_sample(lengths),
        )  # fmt: skip

    def _record(self, path: Path, number: int, raw: bytes) -> dict[str, Any] | None:
        if len(raw) > MAX_LINE_BYTES:
            self.problem(path, number, "format", f"{len(raw) / 1e6:.0f} MB on one line; put one example per line")
            return None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.problem(path, number, "encoding", "not UTF-8 text")
            return None
        if not line.strip():
            return None
        if may_hold_secret(line) and (secret := secret_in_line(json_unescaped(line))) is not None:
            self.problem(path, number, "secret", f"a {secret} (detect-secrets): remove it from the data")
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            self.problem(path, number, "json", f"not valid JSON ({exc.msg} at column {exc.colno})")
            return None
        fmt = _format_of(record)
        if fmt is None:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            self.problem(
                path, number, "format", f"unknown record format {keys}; use messages, prompt/completion or text"
            )
            return None
        if self.format is None:
            self.format = fmt
        elif fmt != self.format:
            self.problem(path, number, "format", f"a {fmt} record among {self.format} records; use one format")
            return None
        wrong = _value_problem(fmt, record)
        if wrong is not None:
            self.problem(path, number, *wrong)
            return None
        odd = _oddity(fmt, record)
        if odd is not None:
            self.problem(path, number, "empty", odd)
        return dict(record)

    def _duplicate(self, split: str, path: Path, number: int, raw: bytes) -> None:
        digest = hashlib.sha256(raw.strip()).hexdigest()
        if split == "train":
            self.seen_in_train.setdefault(digest, number)
        elif digest in self.seen_in_train:
            self.problem(path, number, "duplicate", f"the same as train.jsonl line {self.seen_in_train[digest]}")

    def _count(self, path: Path, batch: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, tuple[int, int]]]:
        """(line, (tokens, offset)) for each record whose template renders; a failing one is a problem."""
        if self.tokens.tokenizer is None or not batch:
            return []
        assert self.format is not None
        rendered: list[tuple[int, tuple[str, str | None]]] = []
        for number, record in batch:
            try:
                rendered.append((number, self.tokens.render(self.format, record, self.mask_prompt)))
            except Exception as exc:  # a template's own raise_exception, a jinja error: the run would fail here too
                self.problem(path, number, "template", f"the chat template fails: {type(exc).__name__}: {exc}")
        counts = self.tokens.count_batch(self.format, [texts for _, texts in rendered])
        return [(number, counted) for (number, _), counted in zip(rendered, counts, strict=True)]


def validate_dataset(
    data: str | Path,
    model: str | Path | None,
    *,
    max_seq_length: int = 2048,
    mask_prompt: bool = False,
    models_root: Path | None = None,
    paths: PathPolicy | None = None,
    progress: Callable[[float], None] | None = None,
) -> DatasetReport:
    """Check every line of `data`'s train/valid/test.jsonl; with a model (folder, .gguf or repo id: its tokenizer and
    chat template), tokenize as a run would. `paths`: the roots the data and model must be under; `progress` gets
    the fraction of the bytes read so far, every batch."""
    model_dir = resolve_model_dir(str(model), models_root, paths) if model is not None else None
    folder = paths.check_folder(Path(data), "data folder") if paths else Path(data).expanduser()
    if not folder.is_dir() or not (folder / "train.jsonl").is_file():
        raise ConfigError(
            f"data folder {str(data)!r} has no train.jsonl; pass a folder holding train.jsonl (and valid.jsonl)"
        )
    files = [(name, folder / f"{name}.jsonl") for name in SPLITS if (folder / f"{name}.jsonl").is_file()]
    total = sum(path.stat().st_size for _, path in files) or 1
    reader = _Reader(_Tokens(model_dir), max_seq_length, mask_prompt, lambda done: progress and progress(done / total))
    splits = [reader.split(name, path) for name, path in files]
    problems = sorted(reader.problems, key=lambda p: (p.kind not in ERRORS, p.file, p.line))
    counts: Counter[str] = Counter(p.kind for p in problems)
    errors = sum(n for kind, n in counts.items() if kind in ERRORS)
    return DatasetReport(
        data=str(folder), format=reader.format, max_seq_length=max_seq_length, mask_prompt=mask_prompt,
        splits=splits, errors=errors, warnings=len(problems) - errors, problem_counts=dict(counts),
        problems=problems[:MAX_LISTED],
    )  # fmt: skip


def trainable_summary(report: DatasetReport, batch_size: int) -> DatasetSummary:
    """What the preflight needs from a report: refused if a line would fail the run or a split cannot fill a batch;
    the longest example's exact tokens (template included) for the memory prediction."""
    refuse_unless_trainable(report)
    by_split = {s.split: s for s in report.splits}
    train, valid = by_split.get("train"), by_split.get("valid")
    n_train, n_valid = (train.examples if train else 0), (valid.examples if valid else 0)
    check_counts(report.data, batch_size, n_train, n_valid)
    longest = [s.tokens_max for s in (train, valid) if s is not None and s.tokens_max is not None]
    return DatasetSummary(
        format=report.format or "text", train_examples=n_train, valid_examples=n_valid,
        longest_tokens=max(longest) if longest else None, length_sample=train.length_sample if train else [],
    )  # fmt: skip


def refuse_unless_trainable(report: DatasetReport) -> None:
    """start_qlora_run's use: a dataset with errors (each would stop the run mid-way) is refused, naming the first."""
    if report.ok:
        return
    first = report.problems[0]
    raise ConfigError(
        f"{first.file} line {first.line}: {first.message} ({first.kind}); {report.errors} line(s) in {report.data} "
        "would fail the run: fix them (validate_dataset lists every one)"
    )
