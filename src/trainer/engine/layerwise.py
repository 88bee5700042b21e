"""A training step evaluated one transformer block at a time: the lowest-memory way to train.

Within one fused step graph, MLX's CUDA backend keeps buffers alive far longer than autodiff needs (so checkpointing
every block barely lowers the peak there: docs/benchmarks.md). Here the step is split by hand:
the forward pass is evaluated block by block keeping only each LoRA block's input, the loss is evaluated in
checkpointed sequence chunks, then each block is recomputed and differentiated (`mx.vjp`) from the last to the
first, its gradients evaluated before the next. The peak is then the weights, the kept block inputs, and one
block's forward and backward. The gradients equal those of `default_loss` up to float rounding.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any

import mlx.core as mx
from mlx.nn.losses import cross_entropy
from mlx.utils import tree_flatten, tree_unflatten

from .fastpath import keep_dequantized
from .losses import CrossEntropy, head_of
from .patches import dropout_keep_probability, stash

#: the step is pipelined up to this many tokens (batch x length). Beyond, the second block in flight costs more memory
#: than the overlap gains (docs/benchmarks.md)
PIPELINE_MAX_TOKENS = 2048
#: tokens (over the whole batch) of one loss chunk: the logits of one chunk are the largest transient of the step
LOSS_CHUNK_TOKENS = 512


def supports_layerwise(model: Any) -> bool:
    inner = getattr(model, "model", None)
    return all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")) and head_of(model) is not None


def block_seeds(count: int) -> list[int]:
    """Random seeds drawn from MLX's global generator: one per LoRA block, plus one to continue from after the step."""
    seeds: list[int] = mx.random.randint(0, 2**31 - 1, (count + 1,)).tolist()  # type: ignore[assignment]
    return seeds


def _has_dropout(layers: list[Any]) -> bool:
    return any(dropout_keep_probability(m) < 1.0 for layer in layers for _, m in layer.named_modules())


class _Pipeline:
    """Hands evaluations to the device at most one ahead: while block k runs, block k+1's graph is built and queued,
    and block k-1 is waited for. Deeper queues would let a GPU allocate several blocks' intermediates at once."""

    def __init__(self, pipelined: bool) -> None:
        self.pipelined = pipelined
        self.pending: list[Any] = []

    def submit(self, *arrays: Any) -> None:
        if not self.pipelined:
            mx.eval(*arrays)
            return
        mx.async_eval(*arrays)
        if self.pending:
            mx.eval(*self.pending)
        self.pending = list(arrays)

    def drain(self) -> None:
        if self.pending:
            mx.eval(*self.pending)
        self.pending = []


class _BlockFunctions:
    """The forward and backward of one block structure as functions of its arrays, compiled once and shared by every
    block of that structure (the frozen blocks share one pair, the LoRA blocks another). A block's arrays are its
    parameters plus the fast path's private float32 copies (`dense_weights`), which are not parameters but are just
    as much the block's own."""

    def __init__(self, template: Any, mask: Any, compiled: bool) -> None:
        self.template = template
        named: list[tuple[str, mx.array]] = tree_flatten(template.parameters())  # type: ignore[assignment]
        trainable_named: list[tuple[str, mx.array]] = tree_flatten(template.trainable_parameters())  # type: ignore[assignment]
        trainable = {name for name, _ in trainable_named}
        self.frozen_names = [name for name, _ in named if name not in trainable]
        self.trainable_names = [name for name, _ in named if name in trainable]
        self.dense_modules = [n for n, m in template.named_modules() if getattr(m, "_dense_weight", None) is not None]
        self.mask = mask
        # the global random state is an input and an output, as in mlx-lm's compiled step, so LoRA dropout draws
        # fresh masks on every call (and a recomputation seeded like its forward pass draws the same ones)
        wrap = partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state) if compiled else (lambda f: f)
        self.forward = wrap(self._forward)
        self.backward = wrap(self._backward)

    def values(self, layer: Any) -> tuple[list[mx.array], list[mx.array]]:
        """The block's frozen arrays (parameters, then dense copies) and its trainable parameters."""
        params = dict(tree_flatten(layer.parameters()))
        modules = dict(layer.named_modules())
        dense = [modules[n]._dense_weight for n in self.dense_modules]
        return [params[n] for n in self.frozen_names] + dense, [params[n] for n in self.trainable_names]

    def _set(self, layer: Any, frozen: list[mx.array], trainable: list[mx.array]) -> None:
        k = len(self.frozen_names)
        names = self.frozen_names + self.trainable_names
        layer.update(tree_unflatten(list(zip(names, frozen[:k] + trainable, strict=True))))
        modules = dict(layer.named_modules())
        for name, dense in zip(self.dense_modules, frozen[k:], strict=True):
            stash(modules[name], "_dense_weight", dense)

    def _apply(self, frozen: list[mx.array], trainable: list[mx.array], h: mx.array) -> mx.array:
        own = self.values(self.template)
        self._set(self.template, frozen, trainable)
        try:
            out: mx.array = self.template(h, self.mask, None)
        finally:  # the template's own arrays back
            self._set(self.template, *own)
        return out

    def _forward(self, frozen: list[mx.array], trainable: list[mx.array], h: mx.array) -> mx.array:
        return self._apply(frozen, trainable, h)

    def _backward(
        self, frozen: list[mx.array], trainable: list[mx.array], h: mx.array, cotangent: mx.array
    ) -> tuple[list[mx.array], mx.array]:
        n = len(trainable)

        def block(*arrays: mx.array) -> mx.array:
            return self._apply(frozen, list(arrays[:n]), arrays[n])

        with keep_dequantized():  # one block's dequantized weights at a time: keep them for its backward
            _, vjps = mx.vjp(block, [*trainable, h], [cotangent])
        return list(vjps[:n]), vjps[n]


class _BlockStack:
    """The model's blocks for one step: which train, their (cached) compiled functions and their dropout seeds."""

    def __init__(self, model: Any, attention_mask: Any, compiled: bool, functions: dict[Any, Any] | None) -> None:
        self.layers = list(model.model.layers)
        self.trainable = [bool(tree_flatten(layer.trainable_parameters())) for layer in self.layers]
        self.first = self.trainable.index(True) if True in self.trainable else len(self.layers)
        self.attention_mask, self.compiled = attention_mask, compiled
        # a compiled function captures the mask as a constant: reuse functions across steps only for a mask by name
        self.by_name = attention_mask is None or isinstance(attention_mask, str)
        self.cache: dict[Any, Any] = functions if functions is not None and self.by_name else {}
        # with LoRA dropout, each LoRA block runs from its own seed, so that its recomputation replays the same masks
        lora = self.layers[self.first :]
        self.seeds = block_seeds(len(lora)) if _has_dropout(lora) else None

    def functions_of(self, index: int) -> _BlockFunctions:
        key = (self.trainable[index], self.compiled, self.attention_mask if self.by_name else None)
        if key not in self.cache:
            self.cache[key] = _BlockFunctions(self.layers[index], self.attention_mask, self.compiled)
        fns: _BlockFunctions = self.cache[key]
        return fns

    def forward(self, h: mx.array, queue: _Pipeline) -> tuple[mx.array, list[mx.array]]:
        """The last hidden state, and each LoRA block's input (kept for its recomputation)."""
        kept: list[mx.array] = []
        for index, layer in enumerate(self.layers):
            fns = self.functions_of(index)
            if index >= self.first:
                kept.append(h)
                if self.seeds:
                    mx.random.seed(self.seeds[index - self.first])
            h = fns.forward(*fns.values(layer), h)
            queue.submit(h)
        queue.drain()
        return h, kept

    def backward(self, kept: list[mx.array], grad_h: mx.array, queue: _Pipeline) -> list[tuple[str, mx.array]]:
        """Each LoRA block recomputed and differentiated, from the last to the first."""
        grads: list[tuple[str, mx.array]] = []
        for offset in reversed(range(len(kept))):
            index = self.first + offset
            fns = self.functions_of(index)
            block_input, kept[offset] = kept[offset], mx.array(0)  # the input is not needed after this block
            if self.seeds:
                mx.random.seed(self.seeds[offset])
            block_grads, grad_h = fns.backward(*fns.values(self.layers[index]), block_input, grad_h)
            names = fns.trainable_names
            grads.extend((f"model.layers.{index}.{name}", g) for name, g in zip(names, block_grads, strict=True))
            queue.submit(grad_h, block_grads)
        queue.drain()
        if self.seeds:
            mx.random.seed(self.seeds[-1])
        return grads


def _chunked_loss(
    model: Any, h: mx.array, targets: mx.array, mask: mx.array, chunk_tokens: int, ce: CrossEntropy
) -> tuple[mx.array, list[mx.array]]:
    """The loss sum and its gradient by hidden state, one sequence chunk at a time, each evaluated before the next:
    the head's logits (and, on the fast path, its dequantized weight) exist for one chunk only."""
    inner, head = model.model, head_of(model)
    assert head is not None, "check supports_layerwise(model) first"
    total = mx.array(0.0, dtype=mx.float32)
    grad_parts = []
    per_row = max(1, chunk_tokens // targets.shape[0])
    # on a GPU the head's dequantized weight is kept from a chunk's forward to its backward (one copy at a time
    # either way); on the CPU its dequantize stays chunked, which bounds the scratch memory there
    keep_head = keep_dequantized() if mx.default_device() != mx.cpu else nullcontext()
    with keep_head:
        for start in range(0, targets.shape[1], per_row):
            stop = start + per_row
            t, m = targets[:, start:stop], mask[:, start:stop]

            def chunk_loss(x: mx.array, t: mx.array = t, m: mx.array = m) -> mx.array:
                return (ce(head(inner.norm(x)), t) * m).astype(mx.float32).sum()

            part, grad_part = mx.value_and_grad(chunk_loss)(h[:, start:stop])
            total = total + part
            mx.eval(total, grad_part)
            grad_parts.append(grad_part)
    return total, grad_parts


def layerwise_value_and_grad(
    model: Any,
    batch: mx.array,
    lengths: mx.array,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
    compiled: bool = True,
    pipelined: bool | None = None,
    functions: dict[Any, Any] | None = None,
    ce: CrossEntropy = cross_entropy,
) -> tuple[mx.array, mx.array, dict[str, Any]]:
    """Loss, token count and the gradients of the model's trainable parameters, all evaluated.

    `compiled`: each block's forward and backward are compiled (fused elementwise kernels, one trace per block
    structure). `pipelined`: blocks are handed to the device with `mx.async_eval`, so building the next block's graph
    overlaps running this one (None: when the batch has at most PIPELINE_MAX_TOKENS tokens). `functions`: a dict
    kept across steps, so the compiled block functions are traced once per run rather than once per step.
    """
    from mlx_lm.models.base import create_attention_mask

    if pipelined is None:
        pipelined = batch.shape[0] * (batch.shape[1] - 1) <= PIPELINE_MAX_TOKENS
    queue = _Pipeline(pipelined)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
    ntoks = mask.sum()

    h = model.model.embed_tokens(inputs)
    blocks = _BlockStack(model, create_attention_mask(h, None), compiled, functions)
    queue.submit(h)
    h, kept = blocks.forward(h, queue)
    total, grad_parts = _chunked_loss(model, h, targets, mask, chunk_tokens, ce)
    loss = total / ntoks
    grad_h = (mx.concatenate(grad_parts, axis=1) if len(grad_parts) > 1 else grad_parts[0]) / ntoks.astype(h.dtype)
    queue.submit(loss, grad_h)
    grads = blocks.backward(kept, grad_h, queue)
    return loss, ntoks, tree_unflatten(grads)


def make_layerwise_eval_loss(ce: CrossEntropy = cross_entropy, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> Any:
    """The validation loss computed as the layerwise step computes its forward pass: block by block, each evaluated
    before the next, then the head in chunks. A whole-model forward in one graph peaked 25-35% over a layerwise run's
    prediction on CUDA (docs/benchmarks.md); this way an evaluation pass peaks no higher than a training step."""
    from mlx_lm.models.base import create_attention_mask

    def layerwise_eval_loss(model: Any, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        inner, head = model.model, head_of(model)
        assert head is not None, "check supports_layerwise(model) first"
        inputs, targets = batch[:, :-1], batch[:, 1:]
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        h = inner.embed_tokens(inputs)
        attention_mask = create_attention_mask(h, None)
        for layer in inner.layers:
            h = layer(h, attention_mask, None)
            mx.eval(h)
        h = inner.norm(h)
        total = mx.array(0.0, dtype=mx.float32)
        per_row = max(1, chunk_tokens // targets.shape[0])
        for start in range(0, targets.shape[1], per_row):
            stop = start + per_row
            part = ce(head(h[:, start:stop]), targets[:, start:stop]) * mask[:, start:stop]
            total = total + part.astype(mx.float32).sum()
            mx.eval(total)
        ntoks = mask.sum()
        return total / ntoks, ntoks

    return layerwise_eval_loss
