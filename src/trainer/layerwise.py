"""A training step evaluated one transformer block at a time: the lowest-memory way to train.

Within one fused step graph, MLX's CUDA backend keeps buffers alive far longer than autodiff needs (measured on an
H200: checkpointing every block lowered the 7B-shape peak at 1x2048 by only 5%). Here the step is split by hand:
the forward pass is evaluated block by block keeping only each LoRA block's input, the loss is evaluated in
checkpointed sequence chunks, then each block is recomputed and differentiated (`mx.vjp`) from the last to the
first, its gradients evaluated before the next. The peak is then the weights, the kept block inputs, and one
block's forward and backward. The gradients equal those of `default_loss` up to float rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.nn.losses import cross_entropy
from mlx.utils import tree_flatten, tree_unflatten

from .losses import head_of

#: tokens per row of one loss chunk: the logits of one chunk are the largest transient of the step
LOSS_CHUNK_TOKENS = 512


def supports_layerwise(model: Any) -> bool:
    inner = getattr(model, "model", None)
    return all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")) and head_of(model) is not None


def layerwise_value_and_grad(
    model: Any, batch: mx.array, lengths: mx.array, chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> tuple[mx.array, mx.array, dict[str, Any]]:
    """Loss, token count and the gradients of the model's trainable parameters, all evaluated."""
    from mlx_lm.models.base import create_attention_mask

    inner, head = model.model, head_of(model)
    assert head is not None, "check supports_layerwise(model) first"
    inputs, targets = batch[:, :-1], batch[:, 1:]
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
    ntoks = mask.sum()

    h = inner.embed_tokens(inputs)
    attention_mask = create_attention_mask(h, None)
    layers = list(inner.layers)
    trainable = [bool(tree_flatten(layer.trainable_parameters())) for layer in layers]
    first = trainable.index(True) if True in trainable else len(layers)
    mx.eval(h)
    for layer in layers[:first]:  # frozen blocks below the adapters: forward only, still one at a time
        h = layer(h, attention_mask, None)
        mx.eval(h)
    kept = []
    for layer in layers[first:]:
        kept.append(h)
        h = layer(h, attention_mask, None)
        mx.eval(h)

    # The loss, one sequence chunk at a time, each evaluated before the next: the head's logits (and, on the fast
    # path, its dequantized weight) exist for one chunk only.
    total = mx.array(0.0, dtype=mx.float32)
    grad_parts = []
    for start in range(0, targets.shape[1], chunk_tokens):
        stop = start + chunk_tokens
        t, m = targets[:, start:stop], mask[:, start:stop]

        def chunk_loss(x: mx.array, t: mx.array = t, m: mx.array = m) -> mx.array:
            return (cross_entropy(head(inner.norm(x)), t) * m).astype(mx.float32).sum()

        part, grad_part = mx.value_and_grad(chunk_loss)(h[:, start:stop])
        total = total + part
        mx.eval(total, grad_part)
        grad_parts.append(grad_part)
    loss = total / ntoks
    grad_h = (mx.concatenate(grad_parts, axis=1) if len(grad_parts) > 1 else grad_parts[0]) / ntoks.astype(h.dtype)
    mx.eval(loss, grad_h)

    grads: list[tuple[str, mx.array]] = []
    for offset in reversed(range(len(kept))):
        index = first + offset
        layer = layers[index]
        named: list[tuple[str, mx.array]] = tree_flatten(layer.trainable_parameters())  # type: ignore[assignment]
        names = [name for name, _ in named]
        values = [value for _, value in named]

        def block(*arrays: mx.array, layer: Any = layer, names: list[str] = names) -> list[mx.array]:
            layer.update(tree_unflatten(list(zip(names, arrays[:-1], strict=True))))
            return [layer(arrays[-1], attention_mask, None)]

        _, vjps = mx.vjp(block, [*values, kept[offset]], [grad_h])
        layer.update(tree_unflatten(list(zip(names, values, strict=True))))  # the real parameters back
        grad_h = vjps[-1]
        block_grads = [(f"model.layers.{index}.{name}", g) for name, g in zip(names, vjps[:-1], strict=True)]
        mx.eval(grad_h, [g for _, g in block_grads])
        kept[offset] = mx.array(0)  # this block's input is no longer needed
        grads.extend(block_grads)
    return loss, ntoks, tree_unflatten(grads)


def train_layerwise(
    model: Any,
    optimizer: Any,
    train_dataset: Any,
    val_dataset: Any | None,
    args: Any,
    iterate_batches: Any,
    training_callback: Any,
) -> None:
    """MLX-LM's training loop semantics (its batching, evaluation, report dicts and adapter files) around the
    layerwise step. Used instead of `mlx_lm.tuner.trainer.train`, whose step is one compiled graph."""
    import time

    from mlx_lm.tuner.trainer import evaluate

    from .losses import make_chunked_loss

    adapter_file = Path(args.adapter_file)

    def save(path: Path) -> None:
        mx.save_safetensors(str(path), dict(tree_flatten(model.trainable_parameters())))

    model.train()
    losses, n_tokens, steps, trained_tokens, train_time = 0.0, 0, 0, 0, 0.0
    batches = iterate_batches(
        dataset=train_dataset, batch_size=args.batch_size, max_seq_length=args.max_seq_length, loop=True
    )
    for it, batch in zip(range(1, args.iters + 1), batches, strict=False):
        tic = time.perf_counter()
        if val_dataset is not None and (it == 1 or it % args.steps_per_eval == 0 or it == args.iters):
            val_loss = evaluate(
                model=model,
                dataset=val_dataset,
                batch_size=args.batch_size,
                num_batches=args.val_batches,
                max_seq_length=args.max_seq_length,
                loss=make_chunked_loss(LOSS_CHUNK_TOKENS),
                iterate_batches=iterate_batches,
            )
            model.train()
            training_callback.on_val_loss_report(
                {"iteration": it - 1, "val_loss": val_loss, "val_time": time.perf_counter() - tic}
            )
            tic = time.perf_counter()
        loss, toks, grads = layerwise_value_and_grad(model, *batch)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state)
        losses += float(loss.item())  # type: ignore[arg-type]
        n_tokens += int(toks.item())  # type: ignore[arg-type]
        steps += 1
        train_time += time.perf_counter() - tic
        if it % args.steps_per_report == 0 or it == args.iters:
            trained_tokens += n_tokens
            training_callback.on_train_loss_report(
                {
                    "iteration": it,
                    "train_loss": losses / steps,
                    "learning_rate": optimizer.learning_rate.item(),
                    "iterations_per_second": steps / train_time,
                    "tokens_per_second": n_tokens / train_time,
                    "trained_tokens": trained_tokens,
                    "peak_memory": mx.get_peak_memory() / 1e9,
                }
            )
            losses, n_tokens, steps, train_time = 0.0, 0, 0, 0.0
        if it % args.steps_per_save == 0:
            save(adapter_file)
            save(adapter_file.parent / f"{it:07d}_adapters.safetensors")
    save(adapter_file)
