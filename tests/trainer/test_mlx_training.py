"""Real QLoRA with MLX-LM in a real worker subprocess, on the tiny model and a learnable synthetic dataset."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import tiny_run_config
from trainer import JobRunner, JobState, RunStore
from trainer.engine.inference import ModelSession

pytestmark = pytest.mark.slow
PROMPT = "Write add_gamma adding 7."
SAMPLE_INTERVAL = 0.2


@pytest.fixture(scope="module")
async def trained(tiny_model: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    home = tmp_path_factory.mktemp("mlx-home")
    async with JobRunner(RunStore(home)) as runner:
        run = await runner.submit(
            tiny_run_config(tiny_model, tiny_data, save_every=20, memory_sample_interval=SAMPLE_INTERVAL)
        )
        done = await runner.wait_until_done(run.id, 300)
        train_reports, val_reports = runner.reports(run.id)
        samples = runner.memory_samples(run.id)
    return done, train_reports, val_reports, samples


async def test_qlora_run_succeeds_and_validation_loss_falls_clearly(trained) -> None:  # type: ignore[no-untyped-def]
    done, train_reports, val_reports, _ = trained
    assert done.state is JobState.SUCCEEDED, done.error
    assert [v.iteration for v in val_reports] == [0, 19, 39]  # mlx-lm: steps done before each pass
    assert val_reports[-1].val_loss < 0.5 * val_reports[0].val_loss
    assert train_reports[-1].iteration == 40 and train_reports[-1].tokens_per_second > 0
    assert done.metrics.first_val_loss == val_reports[0].val_loss
    adapters = Path(done.adapter_path)
    assert (adapters / "adapters.safetensors").is_file() and (
        Path(done.run_dir, "checkpoints", "0000020", "manifest.json")
    ).is_file()


async def test_memory_was_sampled_at_the_configured_rate(trained) -> None:  # type: ignore[no-untyped-def]
    _, _, _, samples = trained
    span = samples[-1].ts - samples[0].ts  # a sample about every interval, however fast the machine trains
    assert len(samples) >= max(3, 0.8 * span / SAMPLE_INTERVAL)
    gaps = [b.ts - a.ts for a, b in zip(samples, samples[1:], strict=False)]
    assert statistics.median(gaps) == pytest.approx(SAMPLE_INTERVAL, abs=0.1)
    assert max(s.rss_gb for s in samples) > 0 and max(s.peak_gb for s in samples) > 0
    assert samples[0].system_total_gb > samples[0].system_available_gb > 0


async def test_adapter_loads_and_changes_generation(trained, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    done = trained[0]
    session = ModelSession()
    session.load(str(tiny_model))
    base = session.generate(PROMPT, max_tokens=24)
    tuned = session.generate(PROMPT, max_tokens=24, adapter=done.adapter_path)
    assert tuned.text != base.text
    assert tuned.text.startswith("def add_"), tuned.text
    # the adapter was for that call only: a plain generate is the loaded base model again
    assert session.generate(PROMPT, max_tokens=24).text == base.text


async def test_mlx_lm_generate_loads_our_adapter(trained, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    done = trained[0]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(tiny_model),
            "--adapter-path",
            done.adapter_path,
            "--prompt",
            PROMPT,
            "--max-tokens",
            "16",
            "--temp",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "def add_" in out.stdout


def test_cli_runs_the_tiny_example_with_progress(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "trainer", "make-tiny", "tiny"], cwd=tmp_path, check=True, timeout=120)
    home = tmp_path / "home"
    run = subprocess.run(
        [sys.executable, "-m", "trainer", "--home", str(home), "run", str(repo / "examples" / "tiny-run.json")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert '"state": "succeeded"' in run.stdout
    assert "60/60" in run.stderr  # the progress bar, on stderr
    listing = subprocess.run(
        [sys.executable, "-m", "trainer", "--home", str(home), "list"], capture_output=True, text=True, check=True
    )
    assert "succeeded" in listing.stdout and "iteration 60/60" in listing.stdout
    run_id = json.loads(run.stdout)["id"]
    for args, expected in (
        (["resume", run_id], f"run {run_id} already succeeded"),
        (["resume", "nope"], "no run with id 'nope'"),
    ):
        refused = subprocess.run(
            [sys.executable, "-m", "trainer", "--home", str(home), *args], capture_output=True, text=True, timeout=120
        )
        assert refused.returncode == 2 and expected in refused.stderr and "Traceback" not in refused.stderr


def test_a_non_finite_loss_report_stops_the_run_as_diverged() -> None:
    from trainer import QLoRAConfig
    from trainer.engine.mlx_backend import _check_finite
    from trainer.errors import Diverged

    config = QLoRAConfig(model="m", data="d", learning_rate=0.5)
    _check_finite("train", 1.5, 3, config)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(
            Diverged, match=r"train loss became (nan|inf) at iteration 3.*lower learning_rate \(now 0.5\)"
        ):
            _check_finite("train", bad, 3, config)


async def test_concurrent_generations_each_use_their_own_adapter(trained, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """Calls with and without an adapter, interleaved from threads, answer as they would one at a time."""
    done = trained[0]
    session = ModelSession()
    session.load(str(tiny_model))
    expected = {
        None: session.generate(PROMPT, max_tokens=12).text,
        done.adapter_path: session.generate(PROMPT, max_tokens=12, adapter=done.adapter_path).text,
    }
    assert expected[None] != expected[done.adapter_path]
    answers: list[tuple[str | None, str]] = []

    async def ask(adapter: str | None) -> None:
        result = await anyio.to_thread.run_sync(lambda: session.generate(PROMPT, max_tokens=12, adapter=adapter))
        answers.append((adapter, result.text))

    async with anyio.create_task_group() as tg:
        for i in range(16):
            tg.start_soon(ask, done.adapter_path if i % 2 else None)
    assert len(answers) == 16 and all(text == expected[adapter] for adapter, text in answers)


def test_a_prompt_longer_than_the_models_context_is_refused(tiny_model: Path) -> None:
    from trainer import ConfigError

    session = ModelSession()
    session.load(str(tiny_model))
    with pytest.raises(ConfigError, match=r"more than the model's context of 1024 tokens"):
        session.generate("add " * 2000, max_tokens=8)


def _word_records(folder: Path, train_words: int, valid_words: int = 0) -> Path:
    """16 training records of `train_words` random code words, and with `valid_words` 24 validation records."""
    import random

    rng = random.Random(0)
    words = "def return value list index count total result items adding write".split()
    folder.mkdir()

    def records(count: int, length: int) -> str:
        return "".join(
            json.dumps({"text": " ".join(rng.choice(words) for _ in range(length))}) + "\n" for _ in range(count)
        )

    (folder / "train.jsonl").write_text(records(16, train_words))
    if valid_words:
        (folder / "valid.jsonl").write_text(records(24, valid_words))
    return folder


async def test_the_watchdog_stops_a_run_whose_evaluation_alone_passes_its_budget(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Short training records, long validation records: the evaluation pass is the run's peak. With a budget between
    the training steps' peak and the evaluation's, the run is stopped in its evaluation phase."""
    data = {"short": _word_records(tmp_path / "short", 12), "long": _word_records(tmp_path / "long", 12, 600)}
    settings = {"iters": 6, "steps_per_eval": 3, "val_batches": -1, "max_seq_length": 1024, "allow_over_budget": True}
    async with JobRunner(RunStore(tmp_path / "home")) as runner:

        async def run(name: str, **extra: Any) -> Any:
            config = tiny_run_config(tiny_model, data[name], memory_sample_interval=0.05, **settings, **extra)
            return await runner.wait_until_done((await runner.submit(config)).id, 300)

        training_only, with_evaluation = await run("short"), await run("long")
        train_peak, eval_peak = training_only.metrics.peak_memory_gb, with_evaluation.metrics.peak_memory_gb
        assert training_only.state is JobState.SUCCEEDED and with_evaluation.state is JobState.SUCCEEDED
        assert eval_peak > 1.5 * train_peak, (train_peak, eval_peak)
        stopped = await run("long", memory_budget_gb=(train_peak + eval_peak) / 2)
    assert stopped.state is JobState.FAILED and stopped.error and stopped.error.kind.value == "memory_budget"
    assert stopped.phase is not None and stopped.phase.value == "evaluating", stopped.phase


async def test_the_watchdog_stops_a_run_whose_training_steps_pass_its_budget(tmp_path: Path, tiny_model: Path) -> None:
    """No validation: the budget is passed in the training steps, and the run stops at the next one (on CUDA a lost
    signal once let such a run train on to its end, docs/benchmarks.md)."""
    data = _word_records(tmp_path / "data", 60)
    async with JobRunner(RunStore(tmp_path / "home")) as runner:
        config = tiny_run_config(tiny_model, data, iters=400, memory_sample_interval=0.05)
        config.update(memory_budget_gb=0.005, allow_over_budget=True)
        done = await runner.wait_until_done((await runner.submit(config)).id, 300)
    assert done.state is JobState.FAILED and done.error and done.error.kind.value == "memory_budget", done
    assert "every step was done" not in done.error.message, done.error.message
    assert done.iteration < 400 and done.phase is not None and done.phase.value == "training", done
