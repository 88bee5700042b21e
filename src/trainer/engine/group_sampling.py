"""Sampling a group of completions of one prompt with the model being trained: the prompt's rows prefilled
together, then decoded together with MLX-LM's KV cache, under the same activations as generate's path
(patches.fast_activations, which the training loop keeps on). Each token is drawn with a key made from the run's
seed, the step and the prompt's place in the batch, so a resumed run draws the same completions. The training model's
LoRA layers are not what the decode kernels of `generate` serve (frozen quantized layers only), so MLX's own
quantized matmuls decode here.

The policy is the model's distribution at the run's temperature: sampling draws from it and the loss scores it (a
small model at temperature 1 rambles: SmolLM2-135M passed a fifth as many tests as at 0.7); greedy decoding is
validation's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np


@dataclass
class Completion:
    tokens: list[int]
    logps: list[float]  # each token's log-probability under the sampling distribution


def sampling_key(*parts: int) -> mx.array:
    """A key for one prompt's group, from (seed, step, index): independent of anything else drawn in the run."""
    return mx.random.key(int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0]))


def sample_group(
    model: Any,
    prompt: list[int],
    count: int,
    max_tokens: int,
    eos: set[int],
    key: mx.array | None,
    temperature: float = 1.0,
) -> list[Completion]:
    """`count` completions of `prompt`, each ending at its first end-of-sequence token (kept) or at `max_tokens`;
    `key` None decodes greedily."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt] * count), cache=cache)[:, -1, :]
    done = [Completion([], []) for _ in range(count)]
    finished = np.zeros(count, bool)
    for _ in range(max_tokens):
        logprobs = logits.astype(mx.float32) / temperature
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        if key is None:
            token = mx.argmax(logprobs, axis=-1)
        else:
            key, draw = mx.random.split(key)
            token = mx.random.categorical(logprobs, key=draw)
        chosen = mx.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
        mx.eval(token, chosen)
        drawn, scored = np.array(token).tolist(), np.array(chosen).tolist()
        for row, (t, lp) in enumerate(zip(drawn, scored, strict=True)):
            if not finished[row]:
                done[row].tokens.append(int(t))
                done[row].logps.append(float(lp))
                finished[row] = int(t) in eos
        if finished.all():
            break
        logits = model(token[:, None], cache=cache)[:, -1, :]
    return done
