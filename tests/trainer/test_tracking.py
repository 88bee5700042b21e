"""The run lifecycle's pure parts, without processes: the events reducer, the final verdict, the wire, the queue."""

from __future__ import annotations

import anyio
import pytest

from trainer import FailureKind, JobState, QLoRAConfig, RunAspect
from trainer.lifecycle.events import (
    WIRE_VERSION,
    EventReader,
    Failed,
    Finished,
    MemorySample,
    PhaseChanged,
    Progress,
    Started,
    TrainReport,
    ValReport,
    WireError,
    decode_line,
    encode_line,
)
from trainer.lifecycle.jobs import Job, Phase
from trainer.lifecycle.scheduler import Scheduler
from trainer.lifecycle.tracking import Ending, RunHistory, apply_event, final_outcome
from trainer.planning.memory_plan import refusal_message

CONFIG = QLoRAConfig(model="m", data="d", iters=10)


def _job() -> Job:
    job = Job(id="r1", config=CONFIG, run_dir="/tmp/r1", iters=10)
    job.transition(JobState.RUNNING)
    return job


def _sample(peak: float) -> MemorySample:
    return MemorySample(rss_gb=1, active_gb=0.5, peak_gb=peak, cache_gb=0, system_total_gb=8, system_available_gb=4)


def _report(iteration: int, loss: float) -> TrainReport:
    return TrainReport(
        iteration=iteration,
        train_loss=loss,
        learning_rate=1e-4,
        iterations_per_second=2.0,
        tokens_per_second=100.0,
        trained_tokens=10 * iteration,
        peak_memory=0.3,
    )


def test_events_fold_into_the_record_and_name_what_changed() -> None:
    job, history = _job(), RunHistory()
    assert apply_event(job, history, Started(pid=1, backend="fake")) == frozenset()
    assert apply_event(job, history, PhaseChanged(phase=Phase.TRAINING)) == {RunAspect.STATUS}
    assert job.phase is Phase.TRAINING
    assert apply_event(job, history, Progress(iteration=3, iters=10)) == {RunAspect.STATUS}
    assert apply_event(job, history, _sample(0.7)) == {RunAspect.MEMORY, RunAspect.STATUS}
    assert apply_event(job, history, _report(5, 1.5)) == {RunAspect.METRICS, RunAspect.STATUS}
    apply_event(job, history, ValReport(iteration=5, val_loss=2.0, val_time=0.1))
    apply_event(job, history, ValReport(iteration=10, val_loss=1.0, val_time=0.1))
    apply_event(job, history, Progress(iteration=4, iters=10))  # a late progress event never moves it back
    assert job.iteration == 5 and job.metrics.last_train_loss == 1.5 and job.metrics.tokens_per_second == 100.0
    assert (job.metrics.first_val_loss, job.metrics.last_val_loss) == (2.0, 1.0)
    assert job.metrics.peak_memory_gb == 0.7  # the larger of the sampled peak and the report's
    assert len(history.memory) == 1 and len(history.train_reports) == 1 and len(history.val_reports) == 2
    apply_event(job, history, Finished(adapter_path="/tmp/r1/adapters", iterations=10))
    assert job.adapter_path == "/tmp/r1/adapters"


@pytest.mark.parametrize(
    ("ending", "state", "kind"),
    [
        (Ending(Finished(adapter_path="a", iterations=10), 0), JobState.SUCCEEDED, None),
        (Ending(Finished(adapter_path="a", iterations=10), 1), JobState.FAILED, FailureKind.CRASHED),
        (Ending(None, -9, cancel_requested=True), JobState.CANCELLED, None),
        (Ending(None, 143, shutting_down=True), JobState.FAILED, FailureKind.INTERRUPTED),
        (Ending(Failed(kind=FailureKind.OOM, message="out of memory"), 1), JobState.FAILED, FailureKind.OOM),
        (Ending(None, -11, stderr_tail="Segmentation fault"), JobState.FAILED, FailureKind.CRASHED),
        (Ending(None, 0), JobState.FAILED, FailureKind.CRASHED),
    ],
)
def test_the_final_state_needs_a_finished_event_and_exit_status_zero(
    ending: Ending, state: JobState, kind: FailureKind | None
) -> None:
    decided, error = final_outcome(_job(), ending)
    assert decided is state
    assert (error.kind if error else None) is kind


def test_a_crash_names_the_signal_and_keeps_the_log_tail() -> None:
    _, error = final_outcome(_job(), Ending(None, -9, stderr_tail="last words"))
    assert error is not None and "SIGKILL" in error.message and "out-of-memory" in error.message
    assert error.stderr_tail == "last words" and error.exit_code == -9


def test_a_succeeded_run_has_no_phase_and_its_summary_reads_as_one_line() -> None:
    job = _job()
    job.phase = Phase.TRAINING
    assert job.snapshot().summary().startswith("run r1: running (training), iteration 0/10")
    job.phase = Phase.SAVING
    job.transition(JobState.SUCCEEDED)
    snap = job.snapshot()
    assert snap.phase is None and snap.summary().startswith("run r1: succeeded, iteration")


def test_the_wire_refuses_another_version_and_replayed_or_reordered_events() -> None:
    line = encode_line(Progress(seq=1, iteration=1, iters=2))
    assert decode_line(line).v == WIRE_VERSION
    with pytest.raises(WireError, match="wire version 2"):
        decode_line(line.replace(b'"v":1', b'"v":2'))
    reader = EventReader()
    reader.decode(line)
    with pytest.raises(WireError, match="replayed or out of order"):
        reader.decode(line)
    reader.decode(encode_line(Progress(seq=3, iteration=2, iters=2)))  # a gap is logged, not refused
    assert reader.last_seq == 3
    with pytest.raises(ValueError):
        reader.decode(b'{"v":1,"seq":4,"type":"no-such-event"}')


async def test_the_queue_keeps_fifo_order_and_its_concurrency_limit() -> None:
    scheduler = Scheduler(max_concurrent=2)
    started: list[str] = []
    release = anyio.Event()

    async def run(run_id: str) -> None:
        started.append(run_id)
        await release.wait()
        scheduler.done(run_id)

    for run_id in ("a", "b", "c", "d"):
        scheduler.enqueue(run_id)
    assert [scheduler.position(r) for r in ("a", "b", "c", "d")] == [0, 1, 2, 3]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler.run, tg, run)
            await anyio.wait_all_tasks_blocked()  # everything the scheduler would start has started
            assert started == ["a", "b"] and scheduler.running == {"a", "b"}
            assert scheduler.position("c") == 2 and scheduler.position("d") == 3
            assert scheduler.remove("d") and not scheduler.remove("d")
            release.set()
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
    assert started == ["a", "b", "c"]


def test_a_refusal_suggests_fit_to_budget_only_when_a_setting_fits() -> None:
    from trainer.planning.memory_estimate import MemoryParts

    parts = MemoryParts(weights_gb=1, lora_gb=1, activations_gb=1, logits_gb=1, slack_gb=0, total_gb=4)

    def predict_fits(config: QLoRAConfig) -> tuple[None, MemoryParts]:
        return None, parts.model_copy(update={"total_gb": 1.0 if config.grad_checkpoint else 4.0})

    def predict_never(config: QLoRAConfig) -> tuple[None, MemoryParts]:
        return None, parts

    fits = refusal_message(CONFIG, parts, 2.0, predict_fits, "cpu")
    assert "grad_checkpoint=true" in fits and "fit_to_budget=true" in fits
    never = refusal_message(CONFIG, parts, 2.0, predict_never, "cpu")
    assert "no smaller setting" in never and "fit_to_budget" not in never and "allow_over_budget=true" in never
