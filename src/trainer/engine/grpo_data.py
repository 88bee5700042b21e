"""grpo's data (loop.RunData): coding tasks {prompt | messages, tests}; each step samples `generations` completions
of each of its prompts with the model as it is (group_sampling), scores them by the share of their task's tests they
pass in the sandbox (results/test_rewards), and batches them with their group-normalized advantages and the
reference's per-token log-probabilities (the base: the adapter switched off). Prompts are ordered by step as
preference pairs are, so a resumed run samples the same completions from the same weights."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import ConfigError
from ..planning.task_records import TaskTests, parse_tests, task_messages
from ..results.test_rewards import TaskScore, score_completions
from .batches import epoch_orders, prompted_rows
from .group_sampling import Completion, sample_group, sampling_key
from .grpo_loss import group_advantages
from .losses import completion_mask, token_logps

#: seeds each epoch's prompt order apart from the other modes' data
_TASKS = 1 << 29


@dataclass
class Tasks:
    prompts: list[list[int]] = field(default_factory=list)  # through the chat template, ready to generate from
    suites: list[TaskTests] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


def _prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    return list(tokenizer.encode("\n".join(m["content"] for m in messages)))


def load_tasks(path: Path, tokenizer: Any) -> Tasks:
    tasks = Tasks()
    if not path.is_file():
        return tasks
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            tasks.suites.append(parse_tests(record["tests"]))
            tasks.prompts.append(_prompt_ids(tokenizer, task_messages(record)))
        except (ValueError, KeyError, TypeError) as exc:  # validate_dataset names these before a run starts
            raise ConfigError(f"{path} line {number}: not a coding task with tests ({exc})") from None
    return tasks


@dataclass
class _Window:
    """What a step's batch sampled (the loop samples a step's batch before the previous step is reported)."""

    rewards: list[float] = field(default_factory=list)
    passed_all: list[bool] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    sample_seconds: float = 0.0

    def add(self, other: _Window) -> None:
        self.rewards += other.rewards
        self.passed_all += other.passed_all
        self.lengths += other.lengths
        self.kl += other.kl
        self.sample_seconds += other.sample_seconds


class GroupData:
    """A grpo run's data (loop.RunData): its tasks, sampled and scored step by step with the model being trained."""

    def __init__(self, train: Tasks, valid: Tasks, config: Any, tokenizer: Any, ce: Any) -> None:
        self.train, self.valid, self.config, self.ce, self.tokenizer = train, valid, config, ce, tokenizer
        self.eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
        self.model: Any = None  # the model being trained (bind), which samples each step's completions
        self.windows: dict[int, _Window] = {}  # by step, until reported

    @property
    def validates(self) -> bool:
        return len(self.valid) > 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.train) // int(self.config.batch_size)

    def training(self, start_step: int) -> Iterator[tuple[int, Any]]:
        """(step, batch) from step `start_step + 1` on; each batch is sampled when the loop asks for it, after the
        previous step's update (MLX orders the two: the sampling reads the updated weights)."""
        c = self.config
        count = len(self.train) // c.batch_size
        if count == 0:
            raise ConfigError(f"{len(self.train)} coding tasks are fewer than batch_size {c.batch_size}; lower it")
        for step, order, place in epoch_orders(len(self.train), count, c.seed, _TASKS, start_step):
            yield step, self._batch(step, [int(r) for r in order[place * c.batch_size : (place + 1) * c.batch_size]])

    def _batch(self, step: int, rows: list[int]) -> tuple[mx.array, ...]:
        c, tic = self.config, time.perf_counter()
        self.model.eval()  # no dropout while sampling
        groups = [
            sample_group(
                self.model, self.train.prompts[r], c.generations, c.completion_tokens, self.eos,
                sampling_key(c.seed, step, place), c.temperature,
            )
            for place, r in enumerate(rows)
        ]  # fmt: skip
        self.model.train()
        prompts = [self.train.prompts[r] for r in rows for _ in range(c.generations)]
        completions = [one for group in groups for one in group]
        scores = self._score(completions, [self.train.suites[r] for r in rows for _ in range(c.generations)])
        rewards = [s.reward(c.format_reward) for s in scores]
        tokens, lengths = group_batch(prompts, completions, c.max_seq_length)
        reference = reference_logps(self.model, tokens, self.ce, c.temperature)
        self.windows[step] = _sampled(completions, scores, tokens, lengths, reference, time.perf_counter() - tic)
        return tokens, lengths, mx.array(group_advantages(rewards, c.generations)), reference

    def _score(self, completions: list[Completion], suites: list[TaskTests]) -> list[TaskScore]:
        return score_completions([self.decode(c.tokens) for c in completions], suites)

    def decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode([t for t in tokens if t not in self.eos]))

    def window_report(self, through_step: int) -> dict[str, float]:
        """The sampling figures of the steps up to `through_step` not reported yet: mean reward (the share of tests
        passed), the share of completions passing all their tests, the KL to the base, completion tokens and the
        seconds spent sampling and scoring."""
        w = _Window()
        for step in [s for s in self.windows if s <= through_step]:
            w.add(self.windows.pop(step))
        if not w.rewards:
            return {}
        return {
            "reward": float(np.mean(w.rewards)),
            "pass_rate": float(np.mean(w.passed_all)),
            "kl": float(np.mean(w.kl)),
            "completion_tokens": float(np.mean(w.lengths)),
            "sample_seconds": w.sample_seconds,
        }

    def validate(self, model: Any, val_loss: Any, progress: Callable[[], None]) -> dict[str, float] | None:
        """Greedy completions of the validation prompts (the first val_batches x batch_size; -1: all) scored by their
        tests: val_reward, val_pass_rate, and val_loss = 1 - val_reward (the share of tests failed)."""
        c = self.config
        count = len(self.valid) if c.val_batches == -1 else min(len(self.valid), c.val_batches * c.batch_size)
        if count == 0:
            return None
        completions = []
        for index in range(count):
            completions += sample_group(model, self.valid.prompts[index], 1, c.completion_tokens, self.eos, None)
            progress()
        scores = self._score(completions, self.valid.suites[:count])
        reward = float(np.mean([s.reward() for s in scores]))
        passed = float(np.mean([s.all_passed for s in scores]))
        return {"val_loss": 1.0 - reward, "val_reward": reward, "val_pass_rate": passed}


def _sampled(
    completions: list[Completion],
    scores: list[TaskScore],
    tokens: mx.array,
    lengths: mx.array,
    reference: mx.array,
    seconds: float,
) -> _Window:
    mask = np.array(completion_mask(tokens, lengths))
    sampled = np.zeros(mask.shape, np.float32)
    for row, c in enumerate(completions):  # the sampling's log-probabilities, where the reference's are
        columns = np.flatnonzero(mask[row])
        sampled[row, columns] = c.logps[: len(columns)]
    gap = np.where(mask, np.array(reference) - sampled, 0.0)
    return _Window(
        rewards=[s.reward() for s in scores],
        passed_all=[s.all_passed for s in scores],
        lengths=[len(c.tokens) for c in completions],
        kl=[float((np.exp(gap) - gap - 1)[mask].mean())] if mask.any() else [],
        sample_seconds=seconds,
    )


def group_batch(prompts: list[list[int]], completions: list[Completion], max_seq_length: int) -> tuple[mx.array, ...]:
    """(tokens, lengths): each prompt and its completion (batches.prompted_rows)."""
    sequences = [p + c.tokens for p, c in zip(prompts, completions, strict=True)]
    return prompted_rows(sequences, [len(p) for p in prompts], max_seq_length)


def reference_logps(model: Any, tokens: mx.array, ce: Any, temperature: float) -> mx.array:
    """Each target token's log-probability under the base (the adapter off), at the run's temperature."""
    from .patches import adapter_off

    with adapter_off(model):
        logps = token_logps(model, tokens, ce, temperature)
        mx.eval(logps)
    return logps


def load_group_data(config: Any, tokenizer: Any) -> GroupData:
    from ..planning.device import fast_path_on
    from .losses import cross_entropy_for

    folder = Path(config.data)
    train, valid = (load_tasks(folder / f"{split}.jsonl", tokenizer) for split in ("train", "valid"))
    return GroupData(train, valid, config, tokenizer, cross_entropy_for(fast_path_on(config.fast_path)))
