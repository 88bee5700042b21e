"""The run's data order as a function of the step alone, so a resumed run reads exactly the batches it would have.

MLX-LM's `iterate_batches` builds the batches (sorted by length, padded as it pads) and shuffles them with NumPy's
global generator, which its validation passes draw from too: the order after step n then depends on everything before
it. Here each epoch gets its own seed (the run's seed and the epoch number) and each validation pass the same one, so
step n's batch is known from n, and a run resumed at n continues with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..planning.device import input_alignment

#: seeds validation passes from the run's seed, apart from every epoch's
_VALIDATION = 1 << 31


def by_token_length(records: Any) -> Any:
    """MLX-LM's `CacheDataset` of `records`, its items sorted into batches by their token counts. MLX-LM's
    `iterate_batches` sorts a `CacheDataset` by `itemlen`, which measures the raw record (a chat record's dict:
    always 1), so its batches are neighbours in file order and mixed lengths pad to the longest: 36% of a batch of
    4 chat records of 100 to 2,048 tokens was padding (docs/benchmarks.md). Tokenizes every record once, up front."""
    from mlx_lm.tuner.datasets import CacheDataset

    class TokenLengthDataset(CacheDataset):
        def itemlen(self, idx: int) -> int:
            return len(self[idx][0])

    return TokenLengthDataset(records)


def aligned(batch: Any) -> Any:
    """The batch with its token array padded (with zeros, masked by its lengths) to a multiple of
    `input_alignment()` inputs. MLX-LM pads to 32 but then caps the length at max_seq_length: 2048-token records at
    max_seq_length 2048 give 2047 inputs, which run markedly slower on CUDA than 2048 (docs/benchmarks.md). The
    padding is masked out of the loss like any other."""
    import mlx.core as mx

    tokens, lengths = batch
    extra = -(tokens.shape[1] - 1) % input_alignment()
    return batch if extra == 0 else (mx.pad(tokens, [(0, 0), (0, extra)]), lengths)


def prompted_rows(sequences: list[list[int]], prompts: list[int], max_seq_length: int) -> tuple[Any, Any]:
    """(tokens, lengths) of sequences that each start with a prompt (a preference pair's replies, grpo's
    completions): padded to the longest, inputs aligned as `aligned` aligns them, cut at max_seq_length; lengths are
    (prompt, length) per row."""
    import mlx.core as mx
    import numpy as np

    lengths = [min(len(s), max_seq_length) for s in sequences]
    width = min(max_seq_length, max(lengths))
    width += -(width - 1) % input_alignment()
    tokens = np.zeros((len(sequences), width), np.int32)
    for row, (sequence, length) in enumerate(zip(sequences, lengths, strict=True)):
        tokens[row, :length] = sequence[:length]
    starts = [min(p, max_seq_length) for p in prompts]
    return mx.array(tokens), mx.array(list(zip(starts, lengths, strict=True)))


def epoch_orders(count: int, per_epoch: int, seed: int, salt: int, start_step: int) -> Iterator[tuple[int, Any, int]]:
    """(step, its epoch's permutation of `count` items, the step's place in its epoch) from step `start_step + 1` on,
    forever: epoch e's permutation is drawn from (seed, e, salt), so step n's batch is known from n alone (preference
    pairs and grpo's tasks; `salt` keeps each kind of data's orders apart)."""
    import numpy as np

    epoch, skip = divmod(start_step, per_epoch)
    step = start_step
    while True:
        order = np.random.default_rng([seed, epoch, salt]).permutation(count)
        for place in range(skip, per_epoch):
            step += 1
            yield step, order, place
        epoch, skip = epoch + 1, 0


def token_passes(batch: Any, pass_tokens: int) -> list[Any]:
    """The batch's examples sorted by length and grouped into passes of at most `pass_tokens` padded inputs (an
    example longer than that alone), each cut to its own longest example (aligned as above): short examples share a
    pass, long ones get one each, and the loss's mask sees the same tokens. A packed batch's rows are split whole."""
    import mlx.core as mx
    import numpy as np

    tokens, lengths = batch
    if lengths.ndim == 3:  # packed rows (packing.py), all as wide: as many whole rows as fit in each pass
        per_pass = max(1, pass_tokens // (tokens.shape[1] - 1))
        return [(tokens[i : i + per_pass], lengths[i : i + per_pass]) for i in range(0, tokens.shape[0], per_pass)]
    ends = np.array(lengths)[:, 1]
    align = input_alignment()
    groups: list[list[int]] = []
    for row in np.argsort(ends, kind="stable").tolist():
        inputs = min(tokens.shape[1] - 1, -(-int(ends[row]) // align) * align)  # the longest so far: this one
        if groups and (len(groups[-1]) + 1) * inputs <= pass_tokens:
            groups[-1].append(row)
        else:
            groups.append([row])
    parts = []
    for group in groups:
        rows = mx.array(group)
        inputs = min(tokens.shape[1] - 1, -(-int(ends[group].max()) // align) * align)
        parts.append((tokens[rows][:, : inputs + 1], lengths[rows]))
    return parts


def batches_per_epoch(dataset: Any, batch_size: int) -> int:
    return len(dataset) // batch_size


def data_position(step: int, per_epoch: int) -> tuple[int, int]:
    """(epoch, batch within it) of the step after `step` steps."""
    return divmod(step, per_epoch)


def training_batches(
    dataset: Any, batch_size: int, max_seq_length: int, seed: int, start_step: int = 0
) -> Iterator[tuple[int, Any]]:
    """(step, batch) from step `start_step + 1` on, forever; epoch e is shuffled with seed (seed, e). In a run of
    several processes, each rank's share of the step's batch (every size-th example, as MLX-LM splits it)."""
    import mlx.core as mx
    from mlx_lm.tuner.trainer import iterate_batches

    group = mx.distributed.init()

    per_epoch = batches_per_epoch(dataset, batch_size)
    if per_epoch == 0:  # iterate_batches says why (fewer records than batch_size)
        yield from ((0, b) for b in iterate_batches(dataset, batch_size, max_seq_length, comm_group=group))
        return
    epoch, skip = data_position(start_step, per_epoch)
    step = start_step
    while True:
        batches = iterate_batches(dataset, batch_size, max_seq_length, loop=False, seed=[seed, epoch], comm_group=group)
        for index, batch in enumerate(batches):
            if index < skip:
                continue
            step += 1
            yield step, aligned(batch)
        epoch, skip = epoch + 1, 0


def validation_batches(seed: int) -> Any:
    """An `iterate_batches` for MLX-LM's `evaluate` that reads the same batches on every pass (comparable losses)."""
    from mlx_lm.tuner.trainer import iterate_batches

    def batches(dataset: Any, batch_size: int, max_seq_length: int, **kw: Any) -> Iterator[Any]:
        kw.pop("loop", None)
        kw["seed"] = [seed, _VALIDATION]
        return (aligned(b) for b in iterate_batches(dataset, batch_size, max_seq_length, loop=False, **kw))

    return batches
