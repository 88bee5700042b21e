"""MCP prompts (prompts/list): the workflows an assistant would otherwise have to guess, as ready-made instructions."""

from __future__ import annotations

from typing import Any

TUNE_ON_REPOSITORY = """\
Fine-tune {model} on the code in {repository} and show whether it got better on code it never saw. Steps:
1. build_dataset(source="{repository}", out="{out}", format="{format}", model="{model}"). Tell me the report's
   splits (records per split), what was skipped and why, and every file left out for a secret (never the secret).
   If it refuses (no supported files, out exists, outside the roots), say the error and its fix.
2. start_qlora_run(config={{"model": "{model}", "data": "{out}", "iters": {iters}}}). Follow it with
   run_status(run_id, wait_seconds=60) until the state is succeeded, failed or cancelled; report loss and memory.
3. evaluate(run_id=<the run>, humaneval_limit=0{test_command}). It works in the background: call it again until its
   state is succeeded. Then show base vs adapter: held-out perplexity and, for instruct data, function-completion
   similarity and exact match, each with its 95% interval, and each entry of `changes` with its verdict. Say plainly
   when a change's interval includes zero (no clear change)."""


def tune_on_repository(
    repository: str, model: str, out: str = "", format: str = "instruct", iters: int = 100, test_command: str = ""
) -> str:
    """From a repository to an evaluated adapter in three tool calls: build_dataset, start_qlora_run, evaluate."""
    folder = out or repository.rstrip("/") + "-dataset"
    extra = f', test_command="{test_command}"' if test_command else ""
    return TUNE_ON_REPOSITORY.format(
        repository=repository, model=model, out=folder, format=format, iters=iters, test_command=extra
    )


def try_a_model(model: str) -> str:
    """Load a model and try it."""
    return (
        f'load_model(path="{model}"), then generate(prompt=...) with a short coding task of mine; report the load time,'
        " memory and tokens/s it answers with."
    )


def fine_tune_and_follow(model: str, data: str, iters: int = 100, mode: str = "sft") -> str:
    """Validate a dataset, start a QLoRA run, follow it to the end."""
    return (
        f'1. validate_dataset(data="{data}", model="{model}"): report problems by line, if any, and stop on errors. '
        "Its format says the mode: examples to imitate (messages, prompt/completion, text) train with mode sft; "
        "pairs of a chosen and a rejected reply (prompt, chosen, rejected) with mode dpo (against the base model) or "
        "orpo (no reference, imitates the chosen replies too); coding tasks with tests (prompt, tests) with mode grpo "
        "(rewarded by the share of tests its own completions pass).\n"
        f'2. start_qlora_run(config={{"model": "{model}", "data": "{data}", "iters": {iters}, "mode": "{mode}"}}): '
        "report the memory prediction it returns.\n3. run_status(run_id, wait_seconds=60) until succeeded, failed or "
        "cancelled; report loss, memory and ETA each time (dpo and orpo: the validation accuracy, the share of "
        "validation pairs whose chosen reply the model prefers; grpo: the reward and validation pass rate).\n"
        "4. generate(run_id=..., prompt=...) to try the adapter."
    )


PROMPTS: dict[str, tuple[Any, str]] = {
    "tune_on_repository": (tune_on_repository, "Tune a model on a repository and evaluate it on held-out code"),
    "try_a_model": (try_a_model, "Try a model"),
    "fine_tune_and_follow": (fine_tune_and_follow, "Fine-tune on a dataset and follow the run"),
}


def register_prompts(mcp: Any) -> None:
    for name, (function, title) in PROMPTS.items():
        mcp.prompt(name=name, title=title)(function)
