"""`python -m trainer`: run, inspect and list fine-tuning runs without MCP. Output goes to stderr except results."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, cast

import anyio
from pydantic import BaseModel
from tqdm import tqdm

from .environment.preload import reexec_with_preloads
from .errors import ConfigError, TrainerError
from .lifecycle.jobs import JobState, RunSnapshot
from .lifecycle.runner import JobRunner
from .lifecycle.store import STORE_FILE, RunStore
from .planning.config import QLoRAConfig
from .planning.preflight import RunDefaults, prepare_run
from .settings import HOME_ENV, default_home

log = logging.getLogger("trainer")


def _describe(snap: RunSnapshot) -> str:
    return snap.summary()


async def _run(raw: dict[str, Any], home: Path) -> int:
    store = RunStore(home)
    defaults = RunDefaults.for_home(home)
    prepared = await anyio.to_thread.run_sync(prepare_run, QLoRAConfig.parse(raw), defaults)  # refusals before start
    async with JobRunner(store, defaults=defaults) as runner:
        snap = runner.enqueue(prepared)
        log.info("run %s queued; folder %s", snap.id, snap.run_dir)
        return await _follow(runner, snap)


async def _resume(run_id: str, force: bool, home: Path) -> int:
    async with JobRunner(RunStore(home)) as runner:
        snap, plan = await runner.resume(run_id, force)
        log.info("%s (attempt %d)", plan.describe(), snap.attempt)
        return await _follow(runner, snap)


async def _follow(runner: JobRunner, snap: RunSnapshot) -> int:
    """A progress bar on stderr until the run ends; its final record as JSON on stdout."""
    with tqdm(total=snap.iters, initial=snap.iteration, desc=f"run {snap.id}", unit="it", file=sys.stderr) as bar:
        while not snap.state.terminal:
            snap = await runner.wait_for_change(snap.id, timeout=1.0)
            bar.update(snap.iteration - bar.n)
            m = snap.metrics
            bar.set_postfix(
                phase=snap.phase.value if snap.phase else snap.state.value,
                loss=f"{m.last_train_loss:.3f}" if m.last_train_loss is not None else "-",
                val=f"{m.last_val_loss:.3f}" if m.last_val_loss is not None else "-",
                tok_s=f"{m.tokens_per_second:.0f}" if m.tokens_per_second else "-",
                mem=f"{m.peak_memory_gb:.2f}GB" if m.peak_memory_gb else "-",
            )
    sys.stdout.write(snap.model_dump_json(indent=2) + "\n")
    log.info("%s", _describe(snap))
    if snap.adapter_path:
        log.info("adapter: %s", snap.adapter_path)
    return 0 if snap.state is JobState.SUCCEEDED else 1


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read run config {str(path)!r}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"run config {str(path)!r} must be a JSON object of settings")
    return raw


def _read(args: argparse.Namespace, home: Path) -> None:
    """`status` and `list`: they only read, so a home with no runs yet is said, not created."""
    if not (home / STORE_FILE).is_file():
        if args.command == "status":
            raise ConfigError(
                f"no run with id {args.run_id!r}: {home} holds no runs yet; pass --home with your runs' folder"
            )
        log.info("no runs yet in %s", home)
    elif args.command == "status":
        sys.stdout.write(RunStore(home).get(args.run_id).snapshot().model_dump_json(indent=2) + "\n")
    else:
        state = JobState(args.state) if args.state else None
        for job in RunStore(home).list_runs(state, args.limit):
            sys.stdout.write(_describe(job.snapshot()) + "\n")


class _Subcommands:
    """add_subparsers, each subcommand also taking the common options (--home)."""

    def __init__(self, action: Any, common: argparse.ArgumentParser) -> None:
        self.action, self.common = action, common

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return cast(argparse.ArgumentParser, self.action.add_parser(name, parents=[self.common], **kwargs))


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # as a command: MLX work in this process (and its children) runs with the preloads
        reexec_with_preloads()
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    home_help = f"runs folder and database (default: {default_home()}, or ${HOME_ENV})"
    parser.add_argument("--home", type=Path, default=None, help=home_help)
    # --home is also taken after the subcommand (SUPPRESS: the subcommand's parser sets it only when given)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", type=Path, default=argparse.SUPPRESS, help=home_help)
    sub = _Subcommands(parser.add_subparsers(dest="command", required=True), common)
    run = sub.add_parser("run", help="run one QLoRA config (JSON) to the end, with a progress bar")
    run.add_argument("config", type=Path)
    resume = sub.add_parser("resume", help="continue a failed or cancelled run from its newest checkpoint, to the end")
    resume.add_argument("run_id")
    resume.add_argument("--force", action="store_true", help="even if its dataset or base model changed since")
    status = sub.add_parser("status", help="show one run as JSON")
    status.add_argument("run_id")
    listing = sub.add_parser("list", help="list runs, newest first")
    listing.add_argument("--state", choices=[s.value for s in JobState])
    listing.add_argument("--limit", type=int, default=20)
    gguf = sub.add_parser("import-gguf", help="turn a GGUF file into an MLX model folder")
    gguf.add_argument("gguf", type=Path)
    gguf.add_argument("out_dir", type=Path)
    _add_result_commands(sub)
    tiny = sub.add_parser("make-tiny", help="write a tiny random qwen2 model and a learnable dataset")
    tiny.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    home = (args.home or default_home()).resolve()
    try:
        if args.command == "run":
            return anyio.run(_run, _read_config(args.config), home)
        if args.command == "resume":
            return anyio.run(_resume, args.run_id, args.force, home)
        if args.command in ("status", "list"):
            _read(args, home)
        elif args.command == "import-gguf":
            from .engine.gguf import import_gguf

            log.info("model folder: %s", import_gguf(args.gguf, args.out_dir))
        elif args.command == "validate":
            from .planning.dataset_report import validate_dataset

            report = validate_dataset(
                args.data, args.model, max_seq_length=args.max_seq_length, mask_prompt=args.mask_prompt
            )
            sys.stdout.write(report.model_dump_json(indent=2) + "\n")
            log.info("%s", report.summary())
            return 0 if report.ok else 1
        elif args.command == "evaluate":
            sys.stdout.write(_evaluate(args, home).model_dump_json(indent=2) + "\n")
        elif args.command == "build-dataset":
            sys.stdout.write(_build_dataset(args).model_dump_json(indent=2) + "\n")
        elif args.command in ("fuse", "export-gguf"):
            sys.stdout.write(_export(args, home).model_dump_json(indent=2) + "\n")
        elif args.command == "make-tiny":
            from .engine.tiny import build_tiny_model, write_synthetic_dataset

            build_tiny_model(args.folder / "model")
            write_synthetic_dataset(args.folder / "data")
            log.info("tiny model in %s, dataset in %s", args.folder / "model", args.folder / "data")
    except TrainerError as exc:
        log.error("error: %s", exc)
        return 2
    except BaseExceptionGroup as group:  # raised inside the runner's task group: still the user's to fix
        mine = group.subgroup(TrainerError)
        if mine is None:
            raise
        log.error("error: %s", _first(mine))
        return 2
    return 0


def _build_dataset(args: argparse.Namespace) -> Any:
    from .planning.repo_dataset import build_dataset

    report = build_dataset(
        args.source, args.out, fmt=args.format, model=args.model, max_seq_length=args.max_seq_length, seed=args.seed,
        held_out=args.held_out,
    )  # fmt: skip
    log.info("%s", report.summary())
    return report


def _add_result_commands(sub: Any) -> None:
    """Before and after a run: build-dataset, validate, evaluate, fuse, export-gguf."""
    build = sub.add_parser("build-dataset", help="a repository as train/valid/test.jsonl, held out by file")
    build.add_argument("source", type=Path, help="the repository's folder")
    build.add_argument("out", type=Path, help="a new folder for the dataset and report.json")
    build.add_argument("--format", choices=["completion", "fim", "instruct"], default="completion")
    build.add_argument("--model", help="its tokenizer counts tokens (and gives fim its tokens)")
    build.add_argument("--max-seq-length", type=int, default=2048, help="sizes the completion and fim chunks")
    build.add_argument("--seed", type=int, default=0, help="which files are held out")
    build.add_argument("--held-out", type=float, default=0.1, help="share of the bytes in each of valid and test")
    check = sub.add_parser("validate", help="check every line of a dataset with the model's tokenizer and template")
    check.add_argument("data", type=Path)
    check.add_argument("--model", help="the model whose tokenizer and chat template the run will use")
    check.add_argument("--max-seq-length", type=int, default=2048)
    check.add_argument("--mask-prompt", action="store_true")
    judge = sub.add_parser("evaluate", help="a run's adapter against its base: HumanEval pass@1, test loss, a checker")
    judge.add_argument("run_id", nargs="?")
    judge.add_argument("--model", help="a model to evaluate instead of a run's (with --adapter: both)")
    judge.add_argument("--adapter")
    judge.add_argument("--data", help="a folder whose test.jsonl gives the loss (default: the run's)")
    judge.add_argument("--limit", type=int, default=164, help="the first N HumanEval problems (default all 164)")
    judge.add_argument("--checker", help="a Python file with score(prompt, reply) -> float")
    judge.add_argument("--completion-limit", type=int, default=50, help="held-out functions to complete (instruct)")
    judge.add_argument("--test-command", help="the repository's tests, run with each generated body in place")
    fuse = sub.add_parser("fuse", help="fuse a run's adapter (or --model and --adapter) into its base model")
    fuse.add_argument("run_id", nargs="?")
    fuse.add_argument("--model", help="the base model (default: the run's)")
    fuse.add_argument("--adapter", type=Path, help="an adapter folder, instead of a run's")
    fuse.add_argument("--out", type=Path, help="the new model folder (default: the run folder's fused/)")
    fuse.add_argument("--keep-quantized", action="store_true", help="re-quantize instead of 16-bit floats")
    export = sub.add_parser("export-gguf", help="write a model folder (a fused model) as a GGUF file")
    export.add_argument("model_dir", type=Path)
    export.add_argument("out", type=Path, help="the .gguf file to write")
    export.add_argument("--type", choices=["f16", "q8_0"], default="f16")
    export.add_argument("--no-check", action="store_true", help="skip loading it back and comparing greedy tokens")


def _evaluate(args: argparse.Namespace, home: Path) -> BaseModel:
    from .results.evaluation import evaluation_spec, run_evaluation

    spec, folder = evaluation_spec(
        RunStore(home), run_id=args.run_id, model=args.model, adapter=args.adapter, data=args.data,
        humaneval_limit=args.limit, checker=args.checker, completion_limit=args.completion_limit,
        test_command=args.test_command,
    )  # fmt: skip
    total = spec.items_per_model() * (2 if spec.adapter else 1)
    with tqdm(total=total, desc="evaluate", unit="item", file=sys.stderr) as bar:
        evaluation = run_evaluation(spec, folder, lambda line: bar.update(1))
    log.info("%s", evaluation.summary())
    return evaluation


def _export(args: argparse.Namespace, home: Path) -> BaseModel:
    from .results.exports import export_gguf, export_inputs, fuse

    if args.command == "export-gguf":
        return export_gguf(args.model_dir.resolve(), args.out.resolve(), args.type, check=not args.no_check)
    adapter = str(args.adapter) if args.adapter else None
    inputs = export_inputs(RunStore(home), run_id=args.run_id, model=args.model, adapter=adapter)
    if inputs.adapter_dir is None:
        raise ConfigError("name a run (run_id), or both --model and --adapter to fuse")
    out = args.out.resolve() if args.out else inputs.fused_dir()
    return fuse(inputs.model_dir, inputs.adapter_dir, out, dequantize=not args.keep_quantized)


def _first(group: BaseExceptionGroup[TrainerError]) -> BaseException:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


if __name__ == "__main__":
    sys.exit(main())
