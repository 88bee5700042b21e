"""build_dataset: a local repository as train/valid/test.jsonl and report.json, held out by file.

Two passes, one file in memory at a time: the first walks the repository and decides which files are usable
(repo_files.py: ignore rules, binaries, generated, vendored, secrets) and hashes their whitespace-free content; the
files are then split by file, near-duplicates (the same hash) kept on one side, deterministically for a seed; the
second pass writes each file's records (repo_records.py) to its split. Everything is written into a staging folder
renamed to OUT at the end: OUT is complete or absent, and an existing OUT is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from .dataset_report import SPLITS
from .modelref import resolve_model_dir
from .paths import PathPolicy
from .repo_files import SkippedFile, SourceFile, classify, walk
from .repo_records import fim_tokens, instruct_records, records

log = logging.getLogger(__name__)
DatasetFormat = Literal["completion", "fim", "instruct"]
#: characters per token of code, to size chunks when no tokenizer is given (measured on Qwen and SmolLM2: 3-4)
CHARS_PER_TOKEN = 3
MAX_LISTED = 50


class SplitCounts(BaseModel):
    split: str
    files: int = 0
    records: int = 0
    tokens: int | None = None


class BuildReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: str
    out: str
    format: DatasetFormat
    seed: int
    files_read: int
    files_used: int
    skipped: dict[str, int] = Field(description="Files (and folders, ending in /) left out, by reason.")
    skipped_files: list[SkippedFile] = Field(description=f"The first {MAX_LISTED} left out; every secret is listed.")
    splits: list[SplitCounts]
    languages: dict[str, int] = Field(description="Files used per language.")
    seconds: float

    def summary(self) -> str:
        parts = ", ".join(f"{s.split} {s.records} records from {s.files} files" for s in self.splits)
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return f"{self.out}: {parts}; {self.files_used} of {self.files_read} files used (skipped: {skipped})"


def assign_splits(
    files: list[SourceFile], seed: int, held_out: float = 0.1, weight: Callable[[SourceFile], int] | None = None
) -> dict[str, str]:
    """relative path -> split. Groups of near-duplicates go together, in an order that is a hash of the seed and the
    group (a seed always gives the same split); test, then valid, take groups until each holds `held_out` of the
    weight (bytes; for instruct, functions), at least one group each when there are three; the rest is train."""
    weigh = weight or (lambda source: source.size)
    groups: dict[str, list[SourceFile]] = {}
    for source in files:
        groups.setdefault(source.similar, []).append(source)
    order = sorted(groups, key=lambda key: hashlib.sha256(f"{seed}:{groups[key][0].relative}".encode()).hexdigest())
    share = held_out * sum(weigh(source) for source in files)
    split_of_group: dict[str, str] = {}
    filled = {"test": 0, "valid": 0}
    for key in order:
        split = next((s for s in ("test", "valid") if len(groups) >= 3 and filled[s] < max(share, 1)), None)
        if split is None or len(split_of_group) >= len(groups) - 1:  # train keeps one group at least
            split = "train"
        else:
            filled[split] += sum(weigh(source) for source in groups[key])
        split_of_group[key] = split
    return {source.relative: split_of_group[source.similar] for source in files}


def build_dataset(
    source: str | Path,
    out: str | Path,
    *,
    fmt: DatasetFormat = "completion",
    model: str | Path | None = None,
    models_root: Path | None = None,
    max_seq_length: int = 2048,
    seed: int = 0,
    held_out: float = 0.1,
    max_file_kb: int = 512,
    paths: PathPolicy | None = None,
    progress: Callable[[float], None] | None = None,
) -> BuildReport:
    """Build the dataset (see the module docstring); ConfigError for a source that cannot give one. `model` (a folder,
    .gguf or repo id) gives the tokenizer that counts tokens, and fim's tokens."""
    started = time.perf_counter()
    policy = paths or PathPolicy()
    model_dir = resolve_model_dir(str(model), models_root, policy) if model is not None else None
    root = policy.check(Path(source), "source")
    target = policy.check(Path(out), "out")
    if not root.is_dir():
        raise ConfigError(f"source {str(source)!r} is not a folder; pass a repository's folder")
    if target.exists():
        raise ConfigError(
            f"out {str(out)!r} exists; name a new folder, which build_dataset creates (nothing is overwritten)"
        )
    if target.is_relative_to(root):
        raise ConfigError(f"out {str(out)!r} is inside the source {str(source)!r}; pick a folder outside it")
    tokenizer = _tokenizer(model_dir)
    fim = _fim(fmt, tokenizer, model_dir)
    usable, skipped, read = _survey(root, max_file_kb * 1024)
    if read == 0:
        raise ConfigError(f"source {str(source)!r} holds no files (after its .gitignore); pass a repository")
    if not usable:
        reasons = ", ".join(f"{n} {r}" for r, n in Counter(s.reason for s in skipped).most_common())
        raise ConfigError(f"source {str(source)!r} has no usable source or docs files ({reasons}); see build_dataset")
    if not 0 < held_out <= 0.4:
        raise ConfigError(
            f"held_out {held_out} is not a fraction in (0, 0.4]; the share of bytes in each of valid and test"
        )
    split_of = assign_splits(usable, seed, held_out, _functions if fmt == "instruct" else None)
    target.parent.mkdir(parents=True, exist_ok=True)
    # a new folder of our own (mkdtemp never reuses a name): the only one removed if the build fails
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        counts, languages = _write(staging, usable, split_of, fmt, max_seq_length, fim, seed, tokenizer, progress)
        report = BuildReport(
            source=str(root), out=str(target), format=fmt, seed=seed, files_read=read, files_used=len(usable),
            skipped=dict(Counter(s.reason for s in skipped)),
            skipped_files=_listed(skipped),
            splits=counts, languages=languages, seconds=round(time.perf_counter() - started, 1),
        )  # fmt: skip
        (staging / "report.json").write_text(report.model_dump_json(indent=1), encoding="utf-8")
        if target.exists():  # taken meanwhile: keep it, and leave nothing of ours
            raise ConfigError(f"out {str(out)!r} appeared while the dataset was built; nothing was written there")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _functions(source: SourceFile) -> int:
    """An instruct file's weight in the split: its documented functions (what its records will be)."""
    if source.language != "python":
        return 0
    return sum(1 for _ in instruct_records(source.path.read_text(encoding="utf-8"), source.relative))


def _listed(skipped: list[SkippedFile]) -> list[SkippedFile]:
    """Every secret (a user must see each), then the first of the rest."""
    return [s for s in skipped if s.reason == "secret"] + [s for s in skipped if s.reason != "secret"][:MAX_LISTED]


def _survey(root: Path, max_bytes: int) -> tuple[list[SourceFile], list[SkippedFile], int]:
    usable: list[SourceFile] = []
    skipped: list[SkippedFile] = []
    read = 0
    for path, placed in walk(root):
        if placed is not None:
            skipped.append(placed)
            continue
        read += 1
        found = classify(path, root, max_bytes)
        (usable if isinstance(found, SourceFile) else skipped).append(found)  # type: ignore[arg-type]
    return usable, skipped, read


def _write(
    staging: Path,
    usable: list[SourceFile],
    split_of: dict[str, str],
    fmt: DatasetFormat,
    max_seq_length: int,
    fim: tuple[str, str, str] | None,
    seed: int,
    tokenizer: Any,
    progress: Callable[[float], None] | None,
) -> tuple[list[SplitCounts], dict[str, int]]:
    counts = {name: SplitCounts(split=name, tokens=0 if tokenizer is not None else None) for name in SPLITS}
    languages: Counter[str] = Counter()
    handles = {name: (staging / f"{name}.jsonl").open("w", encoding="utf-8") for name in SPLITS}
    try:
        for done, source in enumerate(usable, start=1):
            text = source.path.read_text(encoding="utf-8")
            made = records(text, source.language, source.relative, fmt, max_seq_length * CHARS_PER_TOKEN, fim, seed)
            split = counts[split_of[source.relative]]
            split.files += 1
            languages[source.language] += 1
            for record in made:
                handles[split.split].write(json.dumps(record) + "\n")
                split.records += 1
                if tokenizer is not None and split.tokens is not None:
                    split.tokens += _tokens(tokenizer, record)
            if progress is not None:
                progress(done / len(usable))
    finally:
        for handle in handles.values():
            handle.close()
    return list(counts.values()), dict(languages)


def _tokens(tokenizer: Any, record: dict[str, Any]) -> int:
    if "text" in record:
        return len(tokenizer.encode(record["text"]))
    return len(tokenizer.apply_chat_template(record["messages"], return_dict=False))


def _tokenizer(model: Path | None) -> Any:
    if model is None or not (model / "tokenizer.json").is_file():
        return None
    from ..first_import import attribute_once

    return attribute_once("transformers", "AutoTokenizer").from_pretrained(str(model))


def _fim(fmt: DatasetFormat, tokenizer: Any, model: Path | None) -> tuple[str, str, str] | None:
    if fmt != "fim":
        return None
    if tokenizer is None:
        raise ConfigError("format 'fim' needs the model (its tokenizer's FIM tokens); pass model")
    tokens = fim_tokens(set(tokenizer.get_vocab()))
    if tokens is None:
        raise ConfigError(
            f"the tokenizer of {str(model)!r} has no fill-in-the-middle tokens (such as Qwen2.5-Coder's "
            "<|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>); use format 'completion' or a code model that has them"
        )
    return tokens
