"""Held-out figures of one model on a dataset's test split: each record's loss, and each held-out function completed.

Losses: the records tokenized as MLX-LM's loaders do for training (a chat's prompt masked when `mask_prompt`), sorted
by length and batched up to BATCH_TOKENS, one forward each with the CPU activations the product generates with;
summed per record, so results/intervals.py can resample files. Completion: each instruct record's signature and
docstring asked through the chat template, greedy, its code scored against the real body (results/code_match.py)
and, with a test command, run in the repository's tests (results/repo_tests.py).
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..results.code_match import body_of, closed_code_block, exact_match, reply_code, similarity
from ..results.held_out_scores import GENERATED_CHARS, FunctionResult, UnitLoss
from ..results.repo_tests import RepoTests
from .inference import ModelSession
from .patches import fast_activations

#: tokens per forward (rows x longest row): enough rows to keep the matmuls wide, few enough to bound the logits
BATCH_TOKENS = 4096


def _batches(lengths: list[int]) -> Iterator[list[int]]:
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batch: list[int] = []
    for index in order:
        if batch and (len(batch) + 1) * lengths[index] > BATCH_TOKENS:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def record_losses(
    model: Any, tokenizer: Any, records: list[dict[str, Any]], *, max_seq_length: int, mask_prompt: bool
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, scored tokens) per record, in the records' order."""
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    dataset = CacheDataset(create_dataset(records, tokenizer, types.SimpleNamespace(mask_prompt=mask_prompt)))
    items = [dataset[i] for i in range(len(dataset))]
    tokens = [
        list(item[0])[:max_seq_length] if isinstance(item, tuple) else list(item)[:max_seq_length] for item in items
    ]
    offsets = [int(item[1]) if isinstance(item, tuple) else 0 for item in items]
    results: list[tuple[float, int]] = [(0.0, 0)] * len(items)
    with fast_activations(model):
        for batch in _batches([len(t) for t in tokens]):
            width = max(len(tokens[i]) for i in batch)
            if width < 2:
                continue
            rows = np.zeros((len(batch), width), dtype=np.int32)
            for row, index in enumerate(batch):
                rows[row, : len(tokens[index])] = tokens[index]
            positions = np.arange(1, width)  # target k is token k+1
            mask = np.stack([(positions >= max(offsets[i], 1)) & (positions < len(tokens[i])) for i in batch]).astype(
                np.float32
            )
            inputs = mx.array(rows)
            logits = model(inputs[:, :-1]).astype(mx.float32)
            losses = nn.losses.cross_entropy(logits, inputs[:, 1:], reduction="none") * mx.array(mask)
            sums = np.array(losses.sum(axis=1))
            for row, index in enumerate(batch):
                results[index] = (float(sums[row]), int(mask[row].sum()))
    return results


def unit_of(record: dict[str, Any], number: int) -> str:
    """A held-out function (instruct), else its file (a built dataset's chunks), else the record itself."""
    if "body_lines" in record:
        return f"{record.get('file')}:{record.get('function')}:{record['body_lines'][0]}"
    return str(record.get("file") or f"record {number}")


def losses_by_unit(records: list[dict[str, Any]], losses: list[tuple[float, int]]) -> list[UnitLoss]:
    """Summed per unit (unit_of): a file's chunks vary together, so they are resampled together."""
    units: dict[str, list[float]] = {}
    for number, (record, (nll, count)) in enumerate(zip(records, losses, strict=True), start=1):
        name = unit_of(record, number)
        sums = units.setdefault(name, [0.0, 0.0])
        sums[0] += nll
        sums[1] += count
    return [UnitLoss(name=name, nll=nll, tokens=int(count)) for name, (nll, count) in units.items() if count > 0]


def complete_functions(
    session: ModelSession,
    records: list[dict[str, Any]],
    *,
    max_tokens: int,
    tests: RepoTests | None,
    report: Callable[[str], None],
) -> list[FunctionResult]:
    """Each held-out function's body generated from its signature and docstring, and scored."""
    results = []
    for record in records:
        start = time.perf_counter()
        question = next(m["content"] for m in record["messages"] if m["role"] == "user")
        reference = reply_code(next(m["content"] for m in record["messages"] if m["role"] == "assistant"))
        chat = [{"role": "user", "content": question}]
        reply = session.generate(messages=chat, max_tokens=max_tokens, stop_when=closed_code_block).text
        body = body_of(reply_code(reply), record.get("function"))
        outcome = None
        if tests is not None and record.get("file") and record.get("body_lines"):
            first, last = record["body_lines"]
            outcome = tests.outcome_with(str(record["file"]), (int(first), int(last)), body)
        result = FunctionResult(
            file=str(record.get("file", "")), function=str(record.get("function", "")),
            exact=exact_match(body, reference), similarity=round(similarity(body, reference), 4),
            tests=outcome, seconds=round(time.perf_counter() - start, 2), generated=body[:GENERATED_CHARS],
        )  # fmt: skip
        results.append(result)
        report(f"{result.file}:{result.function} similarity {result.similarity:.2f}")
    return results
