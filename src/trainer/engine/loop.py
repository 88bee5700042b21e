"""The training loop: MLX-LM's loop semantics (evaluation at the first step, every `steps_per_eval` and the last; its
report dicts; its compiled step) with a start position, so a run resumed from a checkpoint continues exactly.

`mlx_lm.tuner.trainer.train` always starts at step 1 from a fresh optimizer and draws its batch order from NumPy's
global generator, and writes its adapter files in place; a resumable run needs the start step, the optimizer and
random state restored, the data order a function of the step (batches.py) and saves that are crash-safe (hooks).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import mlx.core as mx

from ..planning.config import QLoRAConfig
from ..planning.device import input_alignment
from .batches import batches_per_epoch, token_passes, training_batches, validation_batches
from .packing import PackedRows
from .run_state import LoopState

#: "1" queues each accumulated pass without waiting for it, so the next pass's graph is built while it runs: an
#: experiment; 5% slower on the 2-core CPU, no faster on an H200 (a pass's fixed cost is the device's; benchmarks.md)
QUEUE_PASSES_ENV = "MCP_LOCAL_QUEUE_PASSES"

#: one training step on a batch: (loss, tokens), the model and optimizer update dispatched (reading them waits)
Step = Callable[[Any], tuple[mx.array, mx.array]]
Loss = Callable[..., tuple[mx.array, mx.array]]


class LoopHooks(Protocol):
    def before_step(self, step: int) -> tuple[Step, Loss] | None:
        """A safe point (a stop may be raised here), and progress; a plan changed from this step on: its step and
        validation loss."""

    def after_step(self, done: LoopState, inputs: int) -> None:
        """`inputs`: the width of the step's batch."""

    def safe_point(self) -> None:
        """Between validation batches: a stop may be raised here."""

    def evaluating(self) -> None: ...

    def val_report(self, info: dict[str, Any]) -> None: ...

    def train_report(self, info: dict[str, Any]) -> None: ...

    def save(self, done: LoopState) -> None:
        """A checkpoint after `done.step` steps."""


class RunData(Protocol):
    """Where a run's batches come from and how its validation is measured."""

    @property
    def validates(self) -> bool:
        """Whether there is validation data."""
        ...

    @property
    def batches_per_epoch(self) -> int: ...

    def training(self, start_step: int) -> Iterator[tuple[int, Any]]:
        """(step, batch) from step `start_step + 1` on."""
        ...

    def validate(self, model: Any, val_loss: Loss, progress: Callable[[], None]) -> dict[str, float] | None:
        """The validation report's numbers (val_loss and any others); None without validation data."""
        ...

    def window_report(self, through_step: int) -> dict[str, float]:
        """The train report's figures besides the loop's own, of the steps since the last report (grpo's rewards)."""
        ...


class SupervisedData:
    """MLX-LM's datasets: batches ordered by step (batches.py), validation by MLX-LM's `evaluate`."""

    def __init__(self, train_set: Any, val_set: Any | None, config: QLoRAConfig) -> None:
        self.train_set, self.val_set, self.config = train_set, val_set, config
        self.packed: PackedRows | None = None
        if config.packing:  # validation stays unpacked: its batches and loss as without packing
            self.packed = PackedRows(train_set, config.max_seq_length, input_alignment())

    @property
    def validates(self) -> bool:
        return self.val_set is not None

    @property
    def batches_per_epoch(self) -> int:
        if self.packed is not None:
            return self.packed.batches_per_epoch(self.config.batch_size)
        return batches_per_epoch(self.train_set, self.config.batch_size)

    def training(self, start_step: int) -> Iterator[tuple[int, Any]]:
        c = self.config
        if self.packed is not None:
            return self.packed.batches(c.batch_size, c.seed, start_step)
        return training_batches(self.train_set, c.batch_size, c.max_seq_length, c.seed, start_step)

    def validate(self, model: Any, val_loss: Loss, progress: Callable[[], None]) -> dict[str, float] | None:
        from mlx_lm.tuner.trainer import evaluate

        if self.val_set is None:
            return None
        c = self.config
        loss = evaluate(
            model=model,
            dataset=self.val_set,
            batch_size=c.batch_size,
            num_batches=c.val_batches,
            max_seq_length=c.max_seq_length,
            loss=val_loss,
            iterate_batches=validation_batches(c.seed),
            progress_callback=progress,
        )
        return {"val_loss": loss}

    def window_report(self, through_step: int) -> dict[str, float]:
        return {}


def fused_step(model: Any, optimizer: Any, loss: Loss) -> Step:
    """MLX-LM's step: loss, gradients and the optimizer update compiled as one graph (in a run of several processes,
    the whole batch's loss and gradients, summed over the ranks)."""
    from mlx.nn.utils import value_and_grad

    from .distributed import sum_over_ranks

    loss_value_and_grad = value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*inputs: mx.array) -> tuple[mx.array, mx.array]:  # tokens, lengths (and a preference batch's reference)
        (value, toks), grad = loss_value_and_grad(model, *inputs)
        value, toks, grad = sum_over_ranks(value, toks, grad)
        optimizer.update(model, grad)
        return value, toks

    def run(batch: Any) -> tuple[mx.array, mx.array]:
        value, toks = step(*batch)
        mx.async_eval(state, value, toks)  # the loop prepares the next batch meanwhile
        return value, toks

    return run


def accumulating_step(model: Any, optimizer: Any, loss: Loss, pass_tokens: int) -> Step:
    """Gradient accumulation: the batch as passes of at most `pass_tokens` padded tokens (batches.token_passes),
    each one's summed loss and gradient added up in float32, then one update: the whole batch's loss and gradient,
    with one pass's activations alive at a time."""
    from mlx.nn.utils import value_and_grad
    from mlx.utils import tree_map

    from .distributed import sum_over_ranks

    loss_value_and_grad = value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)  # value_and_grad sets the model's parameters; dropout draws
    def summed(batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array, Any]:
        (value, toks), grad = loss_value_and_grad(model, batch, lengths)
        weight = toks.astype(mx.float32)
        return value.astype(mx.float32) * weight, toks, tree_map(lambda g: g.astype(mx.float32) * weight, grad)

    @partial(mx.compile, inputs=state, outputs=state)
    def update(total: mx.array, toks: mx.array, grad: Any) -> tuple[mx.array, mx.array]:
        count = toks.astype(mx.float32)
        mean = tree_map(lambda g, p: (g / count).astype(p.dtype), grad, model.trainable_parameters())
        value, toks, mean = sum_over_ranks(total / count, toks, mean)
        optimizer.update(model, mean)
        return value, toks

    queued = os.environ.get(QUEUE_PASSES_ENV) == "1"

    def run(batch: Any) -> tuple[mx.array, mx.array]:
        total, toks, grad = None, None, None
        for part in token_passes(batch, pass_tokens):
            part_total, part_toks, part_grad = summed(*part)
            if grad is None:
                total, toks, grad = part_total, part_toks, part_grad
            else:
                total, toks = total + part_total, toks + part_toks  # type: ignore[operator]
                grad = tree_map(mx.add, grad, part_grad)
            # awaited, this pass's activations are freed before the next pass is built; queued, in stream order
            (mx.async_eval if queued else mx.eval)(total, toks, grad)
        value, toks = update(total, toks, grad)  # type: ignore[arg-type]  # a batch has one example or more
        mx.async_eval(state, value, toks)
        return value, toks

    return run


def in_passes(loss: Loss, pass_tokens: int) -> Loss:
    """Validation in the training plan's passes: the mean loss over the same tokens, each pass evaluated before the
    next, so a validation batch holds no more logits than a training pass (a whole batch's can exceed the plan)."""

    def run(model: Any, tokens: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        total, count = mx.array(0.0, mx.float32), mx.array(0, mx.int32)
        for part in token_passes((tokens, lengths), pass_tokens):
            value, toks = loss(model, *part)
            total, count = total + value.astype(mx.float32) * toks, count + toks
            mx.eval(total, count)
        return total / count, count

    return run


def layerwise_step(model: Any, optimizer: Any, ce: Any) -> Step:
    """The step evaluated one block at a time (layerwise.py)."""
    from .distributed import sum_over_ranks
    from .layerwise import layerwise_value_and_grad

    functions: dict[Any, Any] = {}  # the compiled block functions, traced once for the whole run

    def run(batch: Any) -> tuple[mx.array, mx.array]:
        value, toks, grads = layerwise_value_and_grad(model, batch[0], batch[1], functions=functions, ce=ce)
        value, toks, grads = sum_over_ranks(value, toks, grads)
        optimizer.update(model, grads)
        mx.async_eval(model.trainable_parameters(), optimizer.state)
        return value, toks

    return run


@dataclass
class _Window:
    """The steps since the last train report."""

    loss: float = 0.0
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0


def train_steps(
    model: Any,
    optimizer: Any,
    data: RunData,
    config: QLoRAConfig,
    step: Step,
    val_loss: Loss,
    hooks: LoopHooks,
    start: LoopState,
) -> LoopState:
    """Steps `start.step + 1` .. `config.iters`; returns where it ended. A checkpoint every `save_every` steps
    before the last (the caller saves the final adapter)."""
    done = LoopState(start.step, start.trained_tokens)
    window = _Window()
    if done.step >= config.iters:
        return done
    model.train()
    batches = iter(data.training(done.step))
    it, batch = next(batches)
    # the training phase's clock: batch preparation, steps and reports count; evaluation and checkpoints do not
    clock = time.perf_counter()
    while True:
        changed = hooks.before_step(it)
        if changed is not None:
            step, val_loss = changed
        if data.validates and (it == 1 or it % config.steps_per_eval == 0 or it == config.iters):
            window.seconds += time.perf_counter() - clock
            _evaluate(model, data, val_loss, hooks, it)
            clock = time.perf_counter()
        value, toks = step(batch)
        inputs = int(batch[0].shape[1]) - 1
        if it < config.iters:
            it_next, batch = next(batches)  # prepared while the device computes this step
        window.loss += float(value.item())  # type: ignore[arg-type]
        window.tokens += int(toks.item())  # type: ignore[arg-type]
        window.steps += 1
        done = LoopState(it, done.trained_tokens + int(toks.item()))  # type: ignore[arg-type]
        hooks.after_step(done, inputs)
        if it % config.steps_per_report == 0 or it == config.iters:
            window.seconds += time.perf_counter() - clock
            clock = time.perf_counter()
            hooks.train_report({**_train_report(window, done, optimizer), **data.window_report(it)})
            window = _Window()
        if it >= config.iters:
            return done
        if it % config.save_every == 0:
            window.seconds += time.perf_counter() - clock
            hooks.save(done)
            clock = time.perf_counter()
        it = it_next


def _evaluate(model: Any, data: RunData, val_loss: Loss, hooks: LoopHooks, it: int) -> None:
    # the step before may still be in flight (its backward pass holds the step's peak): on a GPU, validation's
    # buffers would otherwise be allocated on top of it
    mx.synchronize()
    tic = time.perf_counter()
    hooks.evaluating()
    model.eval()
    info = data.validate(model, val_loss, hooks.safe_point)
    model.train()
    if info is not None:
        hooks.val_report({"iteration": it - 1, **info, "val_time": time.perf_counter() - tic})


def _train_report(window: _Window, done: LoopState, optimizer: Any) -> dict[str, Any]:
    return {
        "iteration": done.step,
        "train_loss": window.loss / window.steps,
        "learning_rate": optimizer.learning_rate.item(),
        "iterations_per_second": window.steps / window.seconds,
        "tokens_per_second": window.tokens / window.seconds,
        "trained_tokens": done.trained_tokens,
        "peak_memory": mx.get_peak_memory() / 1e9,
    }
