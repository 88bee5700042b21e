"""Packing: several records in one row of the batch, each attending only to itself, so a batch of mixed lengths
pays (almost) no padding and every step has the same shape (no graph compiled per new length).

A row holds records end to end, each followed by one padding token (MLX-LM's loss trains a record's last target on
it, so a record keeps exactly the targets it has unpacked). Attention is block-diagonal: a position sees the earlier
positions of its own record only. Positions run on across a row; the rotary embedding makes attention depend on
relative positions only, so a record's scores are those it has alone, up to rounding. The mask reaches the model
through the one argument every mlx-lm model passes to its mask builder, the cache (`SegmentMask`).

A packed batch is (tokens, layout): tokens (rows, width + 1); layout (rows, 2, width): each input's record (1, 2, ...
within the row; 0 for padding) and whether each target is trained.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import ConfigError
from .batches import epoch_orders

log = logging.getLogger(__name__)

#: salts the row order's generator apart from every other use of the run's seed
_ROW_ORDER = 7


def extent(tokens: int, max_seq_length: int) -> int:
    """Positions a record takes in a row: its tokens (cut as MLX-LM cuts them) and one padding token."""
    return min(tokens, max_seq_length) + 1


def pack(extents: list[int], capacity: int) -> list[list[int]]:
    """Record indices per row, best-fit decreasing into rows of `capacity` positions: each record, longest first (ties
    in index order), into the row with the least room that holds it (a sorted list of rooms: fast for 100k records)."""
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row), sorted
    for index in sorted(range(len(extents)), key=lambda i: (-extents[i], i)):
        need = extents[index]
        place = bisect.bisect_left(rooms, (need, -1))
        if place == len(rooms):
            rows.append([index])
            bisect.insort(rooms, (capacity - need, len(rows) - 1))
        else:
            room, row = rooms.pop(place)
            rows[row].append(index)
            bisect.insort(rooms, (room - need, row))
    return rows


def packed_rows(rows: list[list[tuple[list[int], int]]], width: int, max_seq_length: int) -> tuple[Any, Any]:
    """(tokens, layout) of one row per list of (tokens, prompt offset) records, `width` inputs wide."""
    import mlx.core as mx

    tokens = np.zeros((len(rows), width + 1), np.int32)
    layout = np.zeros((len(rows), 2, width), np.int32)
    for row, row_records in enumerate(rows):
        start = 0
        for segment, (ids, offset) in enumerate(row_records, start=1):
            length = min(len(ids), max_seq_length)
            tokens[row, start : start + length] = ids[:length]
            layout[row, 0, start : start + length + 1] = segment  # its padding token too, which no other sees
            # as MLX-LM's loss: target column j (predicting token j + 1) trains where offset <= j + 1 <= length
            first = start + max(offset, 1) - 1
            layout[row, 1, first : start + length] = 1
            start += length + 1
    return mx.array(tokens), mx.array(layout)


def row_width(max_seq_length: int, align: int) -> int:
    """Inputs per packed row: the longest record's (max_seq_length and its padding token), aligned."""
    return -(-max_seq_length // align) * align


class PackedRows:
    """A dataset's records packed into rows once (best-fit decreasing), the rows' order shuffled per epoch."""

    def __init__(self, dataset: Any, max_seq_length: int, align: int) -> None:
        self.dataset, self.max_seq_length = dataset, max_seq_length
        self.width = row_width(max_seq_length, align)
        extents = [extent(len(dataset[i][0]), max_seq_length) for i in range(len(dataset))]
        self.rows = pack(extents, self.width + 1)
        self.records = len(extents)
        self.filled = sum(extents) / max(1, len(self.rows) * (self.width + 1))
        log.info("packing: %d records in %d rows of %d tokens, %.1f%% filled", len(extents), len(self.rows),
                 self.width, 100 * self.filled)  # fmt: skip

    def batches_per_epoch(self, batch_size: int) -> int:
        return len(self.rows) // batch_size

    def batches(self, batch_size: int, seed: int, start_step: int) -> Iterator[tuple[int, Any]]:
        """(step, packed batch) from step `start_step + 1` on, forever: epoch e's row order drawn from (seed, e)."""
        per_epoch = self.batches_per_epoch(batch_size)
        if per_epoch == 0:
            raise ConfigError(
                f"packing made {len(self.rows)} rows of {self.max_seq_length} tokens, fewer than batch_size="
                f"{batch_size}; lower batch_size or max_seq_length, or turn packing off"
            )
        for step, order, place in epoch_orders(len(self.rows), per_epoch, seed, _ROW_ORDER, start_step):
            chosen = order[place * batch_size : (place + 1) * batch_size]
            records = [[self.dataset[i] for i in self.rows[r]] for r in chosen]
            yield step, packed_rows(records, self.width, self.max_seq_length)


class SegmentMask:
    """Hands an mlx-lm model the packed rows' attention mask. Every mlx-lm model builds its mask with
    `create_attention_mask(h, cache[0])`, which asks a cache for it; this stands in for the cache: no offset, keys
    and values passed through as they are."""

    offset = 0

    def __init__(self, mask: Any) -> None:
        self.mask = mask
        self.asked = False

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> Any:
        self.asked = True
        return self.mask

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        return keys, values


def segment_mask(segments: Any, dtype: Any = None) -> Any:
    """(rows, 1, n, n): a position sees the earlier positions of its own record (padding sees padding). Boolean,
    or additive in `dtype`: MLX's CUDA attention converts a boolean mask in every layer and keeps each copy for the
    backward pass; one additive mask in the compute type is shared by all."""
    import mlx.core as mx

    n = segments.shape[1]
    causal = mx.arange(n)[None, :] <= mx.arange(n)[:, None]
    allowed = mx.logical_and(segments[:, None, :, None] == segments[:, None, None, :], causal)
    if dtype is None:
        return allowed
    return mx.where(allowed, mx.array(0, dtype), mx.array(-mx.inf, dtype))
