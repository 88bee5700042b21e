"""Fast unit tests: the state machine, the event wire format, the store."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import FailureKind, InvalidTransition, JobError, JobState, MemorySample, QLoRAConfig, RunStore
from trainer.lifecycle.events import Progress, TrainReport, decode_line, encode_line
from trainer.lifecycle.jobs import TRANSITIONS, Job
from trainer.lifecycle.memory import MemorySampler

CFG = QLoRAConfig(model="m", data="d")


def test_reference_defaults_are_qlora_rank_16_alpha_32_4bit_group_64_16_layers() -> None:
    cfg = QLoRAConfig(model="m", data="d")
    assert (cfg.rank, cfg.alpha, cfg.lora_scale, cfg.quantize_bits, cfg.group_size, cfg.num_layers) == (
        16,
        32.0,
        2.0,
        4,
        64,
        16,
    )
    assert cfg.memory_sample_interval is None  # the server's default (settings.DEFAULT_SAMPLE_INTERVAL_S) applies


def test_terminal_states_accept_only_a_resume() -> None:
    assert TRANSITIONS[JobState.SUCCEEDED] == frozenset()
    for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        job = Job(id="x", config=CFG, run_dir="/tmp/x", iters=1, state=state)
        with pytest.raises(InvalidTransition):
            job.transition(JobState.RUNNING)
    for state in (JobState.FAILED, JobState.CANCELLED):  # resume_run: the next attempt, with no trace of the last end
        assert TRANSITIONS[state] == frozenset({JobState.QUEUED})
        job = Job(id="x", config=CFG, run_dir="/tmp/x", iters=1, state=JobState.RUNNING)
        job.transition(state, error=None)
        job.transition(JobState.QUEUED)
        assert (job.attempt, job.error, job.ended_at, job.started_at) == (2, None, None, None)


def test_transition_stamps_times_and_failure_needs_an_error() -> None:
    job = Job(id="x", config=CFG, run_dir="/tmp/x", iters=1)
    with pytest.raises(InvalidTransition):
        job.transition(JobState.SUCCEEDED)  # queued cannot succeed without running
    job.transition(JobState.RUNNING)
    assert job.started_at is not None
    job.transition(JobState.FAILED, error=JobError(kind=FailureKind.OOM, message="m"))
    assert job.ended_at is not None and job.error and job.error.kind is FailureKind.OOM


def test_events_round_trip_as_one_json_line() -> None:
    for event in (
        Progress(seq=3, iteration=2, iters=9),
        TrainReport(
            iteration=1,
            train_loss=2.0,
            learning_rate=1e-4,
            iterations_per_second=1.0,
            tokens_per_second=10.0,
            trained_tokens=5,
            peak_memory=0.1,
        ),
        MemorySample(rss_gb=1, active_gb=0.5, peak_gb=0.6, cache_gb=0.1, system_total_gb=8, system_available_gb=4),
    ):
        line = encode_line(event)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert decode_line(line) == event


def test_store_uses_wal_and_round_trips_a_job(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    job = Job(id="abc", config=CFG.model_copy(update={"iters": 3}), run_dir=str(store.run_dir("abc")), iters=3)
    store.create(job)
    job.transition(JobState.RUNNING)
    job.iteration = 2
    job.metrics.last_train_loss = 1.5
    store.save(job)
    again = RunStore(tmp_path).get("abc")
    assert again == job
    mode = sqlite3.connect(tmp_path / "runs.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert (tmp_path / "runs" / "abc" / "config.json").is_file()


def test_store_create_that_fails_leaves_no_folder(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.create(Job(id="dup", config=CFG, run_dir=str(tmp_path / "runs" / "dup"), iters=1))
    with pytest.raises(sqlite3.IntegrityError):
        store.create(Job(id="dup", config=CFG, run_dir=str(tmp_path / "runs" / "other"), iters=1))
    assert not (tmp_path / "runs" / "other").exists()


def test_trainer_never_imports_mcp() -> None:
    code = (
        "import sys, trainer, trainer.__main__, trainer.lifecycle.worker, trainer.engine.mlx_backend, "
        "trainer.engine.inference; "
        "print(sorted(m for m in sys.modules if m == 'mcp' or m.startswith('mcp.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_surface_is_pinned() -> None:
    import types

    import trainer

    lazy = set(trainer._LAZY)  # the package imports its names on first use (PEP 562)
    assert lazy == set(trainer.__all__)
    for name in trainer.__all__:
        assert not isinstance(getattr(trainer, name), types.ModuleType), name
    loaded = {
        name
        for name, value in vars(trainer).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    } - {"annotations", "Any", "TYPE_CHECKING"}
    assert loaded == set(trainer.__all__)  # after each was used once, nothing else is exported


def test_dense_weight_copies_turn_themselves_on_for_small_models_only() -> None:
    from trainer.planning.memory_plan import dense_fits

    def shape(hidden: int, inter: int, layers: int, vocab: int, tied: bool) -> dict[str, object]:
        return {
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64,
            "num_key_value_heads": 2,
            "vocab_size": vocab,
            "tie_word_embeddings": tied,
        }

    smollm2, qwen_05b = shape(576, 1536, 30, 49152, True), shape(896, 4864, 24, 151936, True)
    qwen_7b = shape(3584, 18944, 28, 152064, False)
    assert dense_fits(smollm2, 16.0) and dense_fits(qwen_05b, 16.0)  # 0.5 and 2.0 GB of float32 copies
    assert not dense_fits(qwen_05b, 8.0)  # more than a fifth of an 8 GB budget
    assert not dense_fits(qwen_7b, 64.0)  # 30 GB of copies: never by itself


def test_the_predictor_knows_the_layerwise_steps_chunk_and_pipeline_sizes() -> None:
    """memory_estimate stays importable without MLX, so it repeats two of the layerwise step's constants."""
    from trainer.engine import layerwise
    from trainer.planning import memory_estimate

    assert memory_estimate.LAYERWISE_LOSS_TOKENS == layerwise.LOSS_CHUNK_TOKENS
    assert memory_estimate.LAYERWISE_PIPELINE_MAX_TOKENS == layerwise.PIPELINE_MAX_TOKENS


def test_memory_sampler_records_a_sample_even_for_a_run_shorter_than_its_interval() -> None:
    samples: list[MemorySample] = []
    with MemorySampler(60.0, samples.append):
        pass  # a run that ends before the sampler thread's first wake-up
    assert len(samples) == 1 and samples[0].rss_gb > 0


def test_a_full_disk_fails_a_run_as_storage_however_it_is_raised() -> None:
    import errno

    from trainer.lifecycle.worker import failure_kind

    assert failure_kind(OSError(errno.ENOSPC, "No space left on device")) is FailureKind.STORAGE
    assert failure_kind(OSError(errno.EDQUOT, "Disk quota exceeded")) is FailureKind.STORAGE
    mlx_style = RuntimeError("[save_safetensors] Failed to write: No space left on device")  # MLX's C++ writers
    assert failure_kind(mlx_style) is FailureKind.STORAGE
    assert failure_kind(OSError(errno.EIO, "Input/output error")) is FailureKind.BACKEND


def test_a_written_record_removes_nothing_outside_the_runs_adapter_dir(tmp_path: Path) -> None:
    from trainer.lifecycle.written import WrittenFiles, file_sha256, remove_written

    adapter_dir, mine = tmp_path / "adapter", tmp_path / "notes.txt"
    adapter_dir.mkdir()
    mine.write_text("a user's")
    ours = adapter_dir / "adapters.safetensors"
    ours.write_bytes(b"weights")
    record = WrittenFiles(
        created_dirs=[str(tmp_path), str(adapter_dir)],
        files={str(mine): file_sha256(mine), str(ours): file_sha256(ours)},  # a record naming a user's file
    )
    removed, kept, _ = remove_written(record, adapter_dir)
    assert removed == [str(ours), str(adapter_dir)] and mine.read_text() == "a user's" and tmp_path.is_dir()
    assert kept == [f"{mine} (not in the run's adapter_dir)", f"{tmp_path} (holds files the run did not write)"]
