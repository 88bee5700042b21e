"""The run lifecycle's pure parts, without processes: the events reducer, the final verdict, the wire, the queue."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import FailureKind, JobState, QLoRAConfig, RunAspect, RunStore
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
from trainer.lifecycle.follow import EventTail
from trainer.lifecycle.jobs import Job, Phase
from trainer.lifecycle.leases import SchedulerElection
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
    with pytest.raises(WireError, match="wire version 9"):
        decode_line(line.replace(f'"v":{WIRE_VERSION}'.encode(), b'"v":9'))
    old = line.replace(
        f'"v":{WIRE_VERSION}'.encode(), b'"v":1'
    )  # a run recorded before the upgrade: readable when rebuilding it
    with pytest.raises(WireError, match="wire version 1"):
        decode_line(old)
    assert decode_line(old, older=True).v == 1
    reader = EventReader()
    reader.decode(line)
    with pytest.raises(WireError, match="replayed or out of order"):
        reader.decode(line)
    reader.decode(encode_line(Progress(seq=3, iteration=2, iters=2)))  # a gap is logged, not refused
    assert reader.last_seq == 3
    with pytest.raises(ValueError):
        reader.decode(b'{"v":1,"seq":4,"type":"no-such-event"}')


def test_the_store_queue_is_fifo_limited_and_never_hands_a_run_out_twice(tmp_path: Path) -> None:
    one, two = RunStore(tmp_path), RunStore(tmp_path)  # two servers on one home
    for index, run_id in enumerate(("a", "b", "c", "d")):
        job = Job(id=run_id, config=CONFIG, run_dir=str(one.run_dir(run_id)), iters=10, created_at=100.0 + index)
        (one if index % 2 else two).create(job)
    assert [one.queued_before(r) for r in "abcd"] == [0, 1, 2, 3]
    first, second = one.claim_next(2), two.claim_next(2)
    assert (first and first.id, second and second.id) == ("a", "b")
    assert one.claim_next(2) is None and two.claim_next(2) is None  # two running: the limit holds across servers
    assert two.get("a").state is JobState.RUNNING and one.queued_before("c") == 0
    done = one.get("a")
    done.transition(JobState.SUCCEEDED)
    assert one.save(done, if_state=JobState.RUNNING)
    assert not two.save(two.get("a"), if_state=JobState.RUNNING)  # the end is recorded once
    third = two.claim_next(2)
    assert third is not None and third.id == "c"


def test_one_scheduler_at_a_time_and_the_next_takes_over_when_it_leaves(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    first, second = SchedulerElection(store, "first"), SchedulerElection(RunStore(tmp_path), "second")
    assert first.hold() and not second.hold() and first.hold()
    first.release()
    assert second.hold() and not first.hold()


def test_the_event_tail_returns_whole_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []  # no file yet: the worker is starting
    path.write_bytes(b'{"a":1}\n{"b":')
    assert tail.read() == [b'{"a":1}\n']
    with path.open("ab") as events:
        events.write(b"2}\n")
    assert tail.read() == [b'{"b":2}\n'] and tail.read() == []


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


def test_the_average_speed_is_trained_tokens_over_the_training_time_not_the_last_window() -> None:
    job, history = _job(), RunHistory()
    first = TrainReport(
        iteration=5, train_loss=2.0, learning_rate=1e-4, iterations_per_second=1.0, tokens_per_second=100.0,
        trained_tokens=1000, peak_memory=0.3,
    )  # fmt: skip
    apply_event(job, history, first)  # 1000 tokens at 100/s: 10 s
    apply_event(
        job, history, first.model_copy(update={"iteration": 10, "tokens_per_second": 500.0, "trained_tokens": 2000})
    )
    m = job.metrics  # then 1000 more at 500/s: 2 s
    assert m.tokens_per_second == 500.0 and m.train_seconds == pytest.approx(12.0)
    assert m.average_tokens_per_second == pytest.approx(2000 / 12, abs=0.1)
    assert "167 tok/s average (500 last window)" in job.snapshot().summary()


def test_the_memory_panel_scales_to_the_run_and_notes_a_far_budget() -> None:
    from trainer.lifecycle.plot import memory_scale

    small = [_sample(1.5)]
    top, shown = memory_scale(small, predicted_gb=1.6, budget_gb=16.0)
    assert shown is False and 1.6 < top < 2.5  # a 1.5 GB run fills the panel; the 16 GB budget is a note
    top, shown = memory_scale(small, predicted_gb=1.6, budget_gb=2.5)
    assert shown is True and top >= 2.5  # a budget near the data is drawn, and fits


def test_a_grpo_run_keeps_its_rewards_and_draws_their_curve() -> None:
    import io

    from PIL import Image

    from trainer.lifecycle.plot import render_run_plot

    job = Job(id="g", config=QLoRAConfig(model="m", data="d", mode="grpo"), run_dir="r", iters=10)
    history = RunHistory()
    reports = [
        TrainReport(
            iteration=i, train_loss=0.01, learning_rate=1e-4, iterations_per_second=0.1, tokens_per_second=20.0,
            trained_tokens=100 * i, peak_memory=3.0, reward=0.2 + 0.05 * i, pass_rate=0.1, kl=0.01,
            completion_tokens=90.0, sample_seconds=30.0,
        )
        for i in (5, 10)
    ]  # fmt: skip
    val = ValReport(iteration=9, val_loss=0.25, val_time=5.0, val_reward=0.75, val_pass_rate=0.5)
    for report in reports:
        apply_event(job, history, report)
    apply_event(job, history, val)
    m = job.metrics
    assert (m.last_reward, m.last_pass_rate, m.last_val_reward, m.last_val_pass_rate) == (0.7, 0.1, 0.75, 0.5)
    png = render_run_plot("grpo", history.train_reports, history.val_reports, [_sample(3.0)], 3.2, None)
    colours = {c for _, c in Image.open(io.BytesIO(png)).convert("RGB").getcolors(maxcolors=1 << 20) or []}
    assert (148, 103, 189) in colours and (140, 86, 75) in colours  # matplotlib's purple and brown: both rewards
