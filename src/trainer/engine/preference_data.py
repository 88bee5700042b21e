"""Preference pairs for dpo and orpo: records {prompt | messages, chosen, rejected} tokenized as MLX-LM tokenizes a
chat (the model's template; the prompt's tokens masked), batched chosen rows over rejected rows, in an order that is
a function of the step (as batches.py orders supervised data), with the reference log-probabilities of each pair.

The reference is the base model (the adapter switched off: no second copy of the weights), scored once before
training and stored with the run (runs/<id>/reference.safetensors): a step then runs one forward pass over its pairs,
not two, and a resumed run reads the same numbers back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import ConfigError
from ..planning.preference_records import completion_text, prompt_messages
from .batches import epoch_orders, prompted_rows

REFERENCE = "reference.safetensors"
#: seeds each epoch's batch order apart from the supervised data's
_PREFERENCE = 1 << 30


@dataclass
class PreferencePairs:
    """Per record: chosen ids, rejected ids, the prompt's length; the reference log-probabilities once scored."""

    chosen: list[list[int]] = field(default_factory=list)
    rejected: list[list[int]] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    reference: np.ndarray | None = None  # [records, 2]: chosen, rejected

    def __len__(self) -> int:
        return len(self.prompt)

    def width(self, index: int) -> int:
        return max(len(self.chosen[index]), len(self.rejected[index]))


def _encode(tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], list[int], int]:
    prompt = prompt_messages(record)
    replies = [completion_text(record[key]) for key in ("chosen", "rejected")]
    if getattr(tokenizer, "chat_template", None):
        start = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False))
        full = [
            list(tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": r}], return_dict=False))
            for r in replies
        ]
        return full[0], full[1], len(start)
    text = "\n".join(m["content"] for m in prompt)
    start = list(tokenizer.encode(text))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    full = [start + list(tokenizer.encode(r, add_special_tokens=False)) + eos for r in replies]
    return full[0], full[1], len(start)


def load_pairs(path: Path, tokenizer: Any) -> PreferencePairs:
    if not path.is_file():
        return PreferencePairs()
    lines = path.read_text(encoding="utf-8").splitlines()
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    try:
        return pairs_of([json.loads(line) for _, line in numbered], tokenizer)
    except _BadRecord as bad:  # validate_dataset names these before a run starts
        raise ConfigError(f"{path} line {numbered[bad.index][0]}: not a preference record ({bad.reason})") from None


class _BadRecord(Exception):
    def __init__(self, index: int, reason: str) -> None:
        self.index, self.reason = index, reason


def pairs_of(records: list[dict[str, Any]], tokenizer: Any) -> PreferencePairs:
    pairs = PreferencePairs()
    for index, record in enumerate(records):
        try:
            chosen, rejected, prompt = _encode(tokenizer, record)
        except (ValueError, KeyError, TypeError) as exc:
            raise _BadRecord(index, str(exc)) from None
        pairs.chosen.append(chosen)
        pairs.rejected.append(rejected)
        pairs.prompt.append(prompt)
    return pairs


def pair_batch(pairs: PreferencePairs, rows: list[int], max_seq_length: int) -> tuple[mx.array, ...]:
    """(tokens, lengths, reference): the chosen sequences over the rejected ones, padded to the longest (its inputs
    aligned as batches.aligned aligns them), cut at max_seq_length; lengths are (prompt, length) per row."""
    sequences = [pairs.chosen[r] for r in rows] + [pairs.rejected[r] for r in rows]
    tokens, lengths = prompted_rows(sequences, [pairs.prompt[r] for r in rows] * 2, max_seq_length)
    reference = np.zeros(len(sequences), np.float32)
    if pairs.reference is not None:
        reference = np.concatenate([pairs.reference[rows, 0], pairs.reference[rows, 1]]).astype(np.float32)
    return tokens, lengths, mx.array(reference)


def _groups(pairs: PreferencePairs, batch_size: int) -> list[list[int]]:
    """Neighbours in length order, as MLX-LM batches (little padding)."""
    order = sorted(range(len(pairs)), key=pairs.width)
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def training_pairs(
    pairs: PreferencePairs, batch_size: int, max_seq_length: int, seed: int, start_step: int = 0
) -> Iterator[tuple[int, tuple[mx.array, ...]]]:
    """(step, batch) from step `start_step + 1` on, forever; epoch e's batch order is drawn from (seed, e)."""
    groups = _groups(pairs, batch_size)
    if not groups:
        raise ConfigError(f"{len(pairs)} preference pairs are fewer than batch_size {batch_size}; lower batch_size")
    for step, order, place in epoch_orders(len(groups), len(groups), seed, _PREFERENCE, start_step):
        yield step, pair_batch(pairs, groups[int(order[place])], max_seq_length)


def validation_pairs(pairs: PreferencePairs, batch_size: int, max_seq_length: int, batches: int) -> Iterator[Any]:
    """The same batches on every pass (comparable numbers): length order, the first `batches` (-1: all)."""
    groups = _groups(pairs, min(batch_size, len(pairs))) if len(pairs) else []
    for group in groups if batches == -1 else groups[:batches]:
        yield pair_batch(pairs, group, max_seq_length)


def score_reference(model: Any, pairs: PreferencePairs, batch_size: int, max_seq_length: int, ce: Any) -> np.ndarray:
    """Each pair's (chosen, rejected) log-probability under the base model: the adapter switched off."""
    from .patches import adapter_off
    from .preference_loss import sequence_logps

    scores = np.zeros((len(pairs), 2), np.float32)
    model.eval()
    groups = _groups(pairs, min(batch_size, len(pairs)))  # as the steps batch them: at step 0 the margins are 0
    grouped = {row for group in groups for row in group}
    rest = [row for row in range(len(pairs)) if row not in grouped]
    with adapter_off(model):
        for rows in groups + ([rest] if rest else []):
            tokens, lengths, _ = pair_batch(pairs, rows, max_seq_length)
            logps, _ = sequence_logps(model, tokens, lengths, ce)
            mx.eval(logps)
            values = np.array(logps)
            scores[rows, 0], scores[rows, 1] = values[: len(rows)], values[len(rows) :]
    model.train()
    return scores


def reference_for(run_dir: Path, split: str, compute: Any) -> np.ndarray:
    """The split's stored reference, or computed now and stored (crash-safely: a temporary file, then renamed)."""
    path = run_dir / REFERENCE
    stored = dict(mx.load(str(path))) if path.is_file() else {}  # type: ignore[arg-type]
    if split in stored:
        return np.array(stored[split])
    scores = compute()
    stored[split] = mx.array(scores)
    staging = run_dir / f".{split}.{REFERENCE}"
    mx.save_safetensors(str(staging), stored)
    staging.replace(path)
    return np.asarray(scores)


class PreferenceData:
    """A preference run's data (loop.RunData): pairs ordered by step; validation by the pairs' accuracy and margin."""

    def __init__(self, train: PreferencePairs, valid: PreferencePairs, config: Any, ce: Any) -> None:
        self.train, self.valid, self.config, self.ce = train, valid, config, ce

    @property
    def validates(self) -> bool:
        return len(self.valid) > 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.train) // int(self.config.batch_size)

    def training(self, start_step: int) -> Iterator[tuple[int, Any]]:
        c = self.config
        return training_pairs(self.train, c.batch_size, c.max_seq_length, c.seed, start_step)

    def validate(self, model: Any, val_loss: Any, progress: Any) -> dict[str, float] | None:
        from .preference_loss import evaluate_pairs

        c = self.config
        batches = validation_pairs(self.valid, c.batch_size, c.max_seq_length, c.val_batches)
        return evaluate_pairs(model, batches, c.mode, c.beta, self.ce, progress)

    def window_report(self, through_step: int) -> dict[str, float]:
        return {}


def load_preference_data(config: Any, tokenizer: Any) -> PreferenceData:
    from ..planning.device import fast_path_on
    from .losses import cross_entropy_for

    folder = Path(config.data)
    train, valid = (load_pairs(folder / f"{split}.jsonl", tokenizer) for split in ("train", "valid"))
    return PreferenceData(train, valid, config, cross_entropy_for(fast_path_on(config.fast_path)))


def score_references(data: PreferenceData, model: Any, run_dir: Path) -> None:
    """dpo's reference for every pair, stored with the run (scored with the adapter off, before the first step)."""
    c = data.config
    for split, pairs in (("train", data.train), ("valid", data.valid)):
        if len(pairs):
            pairs.reference = reference_for(
                run_dir, split, lambda p=pairs: score_reference(model, p, c.batch_size, c.max_seq_length, data.ce)
            )
