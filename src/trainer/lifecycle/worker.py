"""The worker process: `python -m trainer.lifecycle.worker RUN_DIR --db HOME/runs.sqlite3`.

Events are appended to the run's events.jsonl, one line per write (any server on the home follows that file);
stdout and stderr are the run's worker.log, so whatever MLX-LM prints never reaches the events. The worker holds a
lease on its run in the store while it lives, and does not depend on the server that started it: it keeps training
when that server exits. It ends with a `finished`, `failed` or (on SIGTERM) `stopped` event; the server that sees
it end decides the run's final state from that and from whether the process is gone.
"""

from __future__ import annotations

import _thread
import argparse
import errno
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import BinaryIO

from ..errors import CheckpointWriteError, ConfigError, Diverged, TrainerError
from ..planning.config import QLoRAConfig
from ..settings import DEFAULT_SAMPLE_INTERVAL_S
from .backend import (
    BackendEvent,
    Cancelled,
    OverBudget,
    TrainingBackend,
    adapter_dir_for,
    load_backend,
    request_stop,
)
from .events import (
    Checkpoint,
    Failed,
    Finished,
    MemorySample,
    PhaseChanged,
    Progress,
    Started,
    Stopped,
    Stopping,
    TrainReport,
    ValReport,
    encode_line,
)
from .group import FINISH_GRACE_S, RUN_CONFIG_ENV, RankFailure, RankGroup
from .jobs import FailureKind
from .leases import LeaseKeeper
from .memory import MemorySampler
from .run_log import last_seq
from .written import WrittenLog

log = logging.getLogger(__name__)
#: what a run writes into its adapter_dir (MLX-LM's layout)
ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")
EXIT_FAILED = 1
EXIT_CANCELLED = 128 + signal.SIGTERM
#: how long rank 0, failing, waits to learn whether another rank's death caused it
RANK_FAILURE_WAIT_S = 3.0


class EventWriter:
    """Thread-safe, strictly increasing `seq`, one line per write (the sampler thread writes too). The first end
    event (`end`) is the last line written: a group's watcher thread and the main thread may both try to end a run."""

    def __init__(self, channel: BinaryIO, after_seq: int = 0) -> None:
        self._channel = channel
        self._lock = threading.Lock()
        self._seq = after_seq  # a resumed run's worker continues its events.jsonl after the last attempt's
        self._ended = False

    def __call__(self, event: BackendEvent | MemorySample | Started | Stopping) -> None:
        with self._lock:
            if not self._ended:
                self._write(event)

    def end(self, event: Finished | Failed | Stopped) -> bool:
        """Write the run's end, unless another already was; returns whether this one was."""
        with self._lock:
            if self._ended:
                return False
            self._ended = True
            self._write(event)
            return True

    def _write(self, event: BackendEvent | MemorySample | Started | Stopping | Finished | Failed | Stopped) -> None:
        self._seq += 1
        self._channel.write(encode_line(event.model_copy(update={"seq": self._seq})))
        self._channel.flush()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    request_stop(Cancelled)


def _on_over_budget(signum: int, frame: FrameType | None) -> None:
    request_stop(OverBudget)


class Watchdog:
    """Passes memory samples on, and stops the run once MLX's peak passes the budget: SIGUSR1's Python handler is run
    in the main thread by Python itself, not through the OS, where a GPU library may have taken the signal (on CUDA a
    run passed its budget at step 7 and trained to step 30, docs/benchmarks.md)."""

    def __init__(self, budget_gb: float | None, emit: EventWriter) -> None:
        self.budget_gb = budget_gb
        self.emit = emit
        self.tripped: MemorySample | None = None

    def __call__(self, sample: MemorySample) -> None:
        self.emit(sample)
        if self.budget_gb and self.tripped is None and sample.peak_gb > self.budget_gb:
            self.tripped = sample
            _thread.interrupt_main(signal.SIGUSR1)


def failure_kind(exc: BaseException) -> FailureKind:
    if isinstance(exc, Diverged):
        return FailureKind.DIVERGED
    if isinstance(exc, CheckpointWriteError) or _disk_full(exc):
        return FailureKind.STORAGE
    if isinstance(exc, ConfigError | FileNotFoundError):
        return FailureKind.CONFIG
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "out of memory" in text or "bad_alloc" in text:
        return FailureKind.OOM
    if isinstance(exc, ValueError):
        return FailureKind.CONFIG
    return FailureKind.BACKEND


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC or a quota, raised by Python or reported in the text of an MLX error (its file writers are C++)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "no space left on device" in str(exc).lower() or "disk quota exceeded" in str(exc).lower()


def run(run_dir: Path, emit: EventWriter, attempt: int = 1) -> int:
    config = _read_config(run_dir)
    backend = load_backend()
    try:
        device = backend.device()
    except TrainerError as exc:  # no MLX backend installed: the run fails saying what to install
        emit(Started(pid=os.getpid(), backend=backend.name, device="unavailable", attempt=attempt))
        emit.end(Failed(kind=FailureKind.BACKEND, message=str(exc)))
        return EXIT_FAILED
    emit(Started(pid=os.getpid(), backend=backend.name, device=device, attempt=attempt))
    watchdog = Watchdog(config.memory_budget_gb, emit)
    group = _start_group(config, run_dir, emit, watchdog) if config.distributed else None
    code = EXIT_FAILED
    try:
        with MemorySampler(config.memory_sample_interval or DEFAULT_SAMPLE_INTERVAL_S, watchdog):
            code = _train(backend, config, run_dir, emit, watchdog, group)
    finally:
        if group is not None:  # finished: the others finish too; stopped or failed: they are stopped now
            group.close(FINISH_GRACE_S if code == 0 else 0.0)
    return code


def _start_group(config: QLoRAConfig, run_dir: Path, emit: EventWriter, watchdog: Watchdog) -> RankGroup:
    """Rank 0 of a run of several processes: start the others; a rank's death or a hang ends the whole group now
    (this rank may be waiting in a collective for the dead one, so it cannot wait for a safe point)."""

    def abandon(failure: RankFailure) -> None:
        if emit.end(Failed(kind=failure.kind, message=f"{failure.message}; the whole group was stopped")):
            group.close()
            os._exit(EXIT_FAILED)

    group = RankGroup(run_dir, config, watchdog, abandon)
    group.start()
    return group


def _train(
    backend: TrainingBackend,
    config: QLoRAConfig,
    run_dir: Path,
    emit: EventWriter,
    watchdog: Watchdog,
    group: RankGroup | None,
) -> int:
    adapter_dir = adapter_dir_for(config, run_dir)
    written = _record_outside(adapter_dir, run_dir)

    def backend_emit(event: BackendEvent) -> None:
        if group is not None:
            group.beat(isinstance(event, Progress | TrainReport | ValReport))
        if written is not None and isinstance(event, Checkpoint | PhaseChanged):  # after the adapter or its config
            written.note(adapter_dir, ADAPTER_FILES)
        emit(event)

    try:
        try:
            adapter = backend.train(config, run_dir, backend_emit)
        finally:  # whatever the ending, the record names every adapter file the run wrote
            if written is not None:
                written.note(adapter_dir, ADAPTER_FILES)
    except OverBudget:
        emit.end(_over_budget(config, run_dir, watchdog.tripped))
        return EXIT_FAILED
    except Cancelled:
        log.info("stopped by SIGTERM")
        saved = (adapter_dir / "adapters.safetensors").is_file()
        emit.end(Stopped(adapter_path=str(adapter_dir) if saved else None))
        return EXIT_CANCELLED
    except Exception as exc:  # top-level handler: report any failure to the parent, then exit non-zero
        log.error("training failed:\n%s", traceback.format_exc())
        if group is not None:
            group.wait_for_failure(RANK_FAILURE_WAIT_S)  # a rank's death, if that is the cause, ends the run itself
        emit.end(Failed(kind=failure_kind(exc), message=f"{type(exc).__name__}: {exc}"))
        return EXIT_FAILED
    if watchdog.tripped is not None:  # passed the budget where a stop is dropped (the final save): fails all the same
        emit.end(_over_budget(config, run_dir, watchdog.tripped, every_step_done=True))
        return EXIT_FAILED
    emit.end(Finished(adapter_path=str(adapter), iterations=config.iters))
    return 0


def _record_outside(adapter_dir: Path, run_dir: Path) -> WrittenLog | None:
    """An adapter_dir outside the run's folder: create it, recording what it creates and (later) writes there."""
    if adapter_dir.resolve().is_relative_to(run_dir.resolve()):
        return None  # inside the run's folder, which goes whole with the run
    written = WrittenLog(run_dir)
    written.make_folder(adapter_dir)
    return written


def _over_budget(
    config: QLoRAConfig, run_dir: Path, sample: MemorySample | None, every_step_done: bool = False
) -> Failed:
    measured = f"{sample.peak_gb:.3f} GB" if sample else "more"
    if sample is not None and config.num_processes > 1:
        measured += f" on rank {sample.rank}"
    adapter_dir = adapter_dir_for(config, run_dir)
    saved = (adapter_dir / "adapters.safetensors").is_file()
    where = f"the adapter so far is saved in {adapter_dir}" if saved else "no adapter had been trained yet"
    said = "stopped"
    if every_step_done and saved:  # nothing was stopped: the peak was first seen after the last step
        said, where = "over budget", f"every step was done and the adapter is saved in {adapter_dir}"
    return Failed(
        kind=FailureKind.MEMORY_BUDGET,
        message=f"{said}: MLX peak memory reached {measured}, over the run's budget of "
        f"{config.memory_budget_gb:.3f} GB; {where}; lower batch_size or max_seq_length, or set "
        "grad_checkpoint/chunked_loss (fit_to_budget picks them)",
        adapter_path=str(adapter_dir) if saved else None,
    )


def run_rank(run_dir: Path, channel: BinaryIO) -> int:
    """Rank 1.. of a run of several processes: train in step with rank 0, which writes everything; send it memory
    samples and a failure. Only rank 0 stops the group (SIGTERM is ignored); rank 0 gone, this one exits too."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    writer = EventWriter(channel)

    def emit(event: MemorySample) -> None:
        try:
            writer(event)
        except OSError:  # rank 0 is gone (on another machine, this is how a rank learns it)
            log.error("the channel to rank 0 closed; exiting")
            os._exit(EXIT_FAILED)

    config = _read_config(run_dir)
    with MemorySampler(config.memory_sample_interval or DEFAULT_SAMPLE_INTERVAL_S, emit):
        try:
            load_backend().train(config, run_dir, lambda event: None)
        except Exception as exc:
            log.error("training failed:\n%s", traceback.format_exc())
            writer.end(Failed(kind=failure_kind(exc), message=f"{type(exc).__name__}: {exc}"))
            return EXIT_FAILED
    return 0


def _read_config(run_dir: Path) -> QLoRAConfig:
    given = os.environ.get(RUN_CONFIG_ENV)  # a rank on another machine: no run folder there
    return QLoRAConfig.model_validate_json(given or (run_dir / "config.json").read_text(encoding="utf-8"))


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    log.error("rank 0 (pid %d) is gone; exiting", parent)
    os._exit(EXIT_FAILED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.lifecycle.worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--db", type=Path, help="the store's database, for this run's lease (rank 0 only)")
    parser.add_argument("--attempt", type=int, default=1, help="2 and on: a resumed run (its newest checkpoint)")
    parser.add_argument("--rank", type=int, default=0, help="1 and on: a rank that rank 0 started (group.py)")
    parser.add_argument("--channel-fd", type=int, help="with --rank: the pipe to rank 0")
    args = parser.parse_args(argv)
    rank = f" rank {args.rank}" if args.rank else ""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=f"%(asctime)s{rank} %(name)s %(message)s")
    if args.rank:
        channel_fd = args.channel_fd
        if channel_fd == 1:  # the channel is our stdout: what MLX-LM prints goes to stderr instead
            channel_fd = os.dup(1)
            os.dup2(2, 1)
        with os.fdopen(channel_fd, "ab", buffering=0) as channel:
            return run_rank(args.run_dir, channel)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGUSR1, _on_over_budget)
    run_dir = args.run_dir
    if args.db is None:
        parser.error("--db is required (but for --rank 1 and on)")
    # unbuffered append: each event is one write(2) of one line, so a follower never reads half an event
    with LeaseKeeper(args.db, run_dir.name), open(run_dir / "events.jsonl", "ab", buffering=0) as channel:
        after_seq = last_seq(run_dir)
        if channel.tell() and not _ends_with_newline(run_dir / "events.jsonl"):
            channel.write(b"\n")  # a torn last line of a killed worker stays one unreadable line, apart from ours
        writer = EventWriter(channel, after_seq)
        _acknowledge_stops(writer)
        try:
            return run(run_dir, writer, args.attempt)
        except Cancelled:
            return EXIT_CANCELLED


def _acknowledge_stops(emit: EventWriter) -> None:
    """Python runs the SIGTERM handler only between bytecodes, so a long MLX step delays the stop; the C-level wakeup
    byte arrives at once, and a thread tells the runner the stop is under way (it then waits for the step and the
    save, measured, instead of killing the worker after a fixed grace). A worker that ignores SIGTERM sends nothing."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch() -> None:
        while signal.SIGTERM not in os.read(read_fd, 64):
            pass
        emit(Stopping())

    threading.Thread(target=watch, name="stop-ack", daemon=True).start()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


if __name__ == "__main__":
    sys.exit(main())
