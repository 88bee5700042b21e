"""A run of several processes, the parts that need no second process: its config, its per-process memory plan, how
its events end and how each rank's memory is kept (the processes themselves: tests/mcp/test_distributed.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from trainer.errors import ConfigError
from trainer.lifecycle.events import Failed, Finished, MemorySample, decode_line
from trainer.lifecycle.group import rank_env
from trainer.lifecycle.jobs import FailureKind, Job
from trainer.lifecycle.tracking import RunHistory, apply_event
from trainer.lifecycle.worker import EventWriter
from trainer.planning.config import QLoRAConfig
from trainer.planning.memory_plan import _alternatives, plan_for
from trainer.planning.paths import PathPolicy
from trainer.planning.preflight import RunDefaults, prepare_run


def config(**overrides: object) -> QLoRAConfig:
    return QLoRAConfig.parse({"model": "m", "data": "d", **overrides})


def test_the_batch_must_split_over_the_processes() -> None:
    with pytest.raises(ConfigError, match="batch_size 6 does not split over num_processes 4; use a multiple of 4"):
        config(batch_size=6, num_processes=4)
    assert config(batch_size=8, num_processes=4).per_process_batch == 2
    assert not config().distributed and config(num_processes=2).distributed
    assert config(backend="nccl").distributed and not config(backend="ring").distributed  # a ring of one: no group


def test_memory_is_planned_per_process_and_fitting_keeps_the_split() -> None:
    assert plan_for(config(batch_size=8, num_processes=4), 256, 4).batch_size == 2
    batches = [
        step["batch_size"] for step in _alternatives(config(batch_size=12, num_processes=3)) if "batch_size" in step
    ]
    assert list(dict.fromkeys(batches)) == [6, 3]  # halved, then the sequence shortened at 3


def test_processes_sharing_a_cpu_host_share_its_default_budget(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    defaults = RunDefaults.for_home(tmp_path / "home", roots=(tmp_path, tiny_model.parent, tiny_data.parent))
    defaults = defaults.model_copy(update={"memory_budget_gb": 8.0})
    base = {"model": str(tiny_model), "data": str(tiny_data), "batch_size": 4, "num_layers": 4}
    alone = prepare_run(QLoRAConfig.parse(base), defaults)
    two = prepare_run(QLoRAConfig.parse({**base, "num_processes": 2}), defaults)
    assert alone.config.memory_budget_gb == 8.0 and two.config.memory_budget_gb == 4.0
    assert two.memory is not None and alone.memory is not None
    assert two.memory.prediction.total_gb < alone.memory.prediction.total_gb  # half the batch per process
    chosen = prepare_run(QLoRAConfig.parse({**base, "num_processes": 2, "memory_budget_gb": 6.0}), defaults)
    assert chosen.config.memory_budget_gb == 6.0  # the user's budget is per process as given


def test_the_first_end_event_is_the_last_line() -> None:
    channel = io.BytesIO()
    writer = EventWriter(channel)  # type: ignore[arg-type]
    assert writer.end(Failed(kind=FailureKind.CRASHED, message="rank 1 of 2 was killed by signal SIGKILL"))
    assert not writer.end(Finished(adapter_path="a", iterations=1))
    writer(MemorySample(rss_gb=1, active_gb=1, peak_gb=1, cache_gb=0, system_total_gb=2, system_available_gb=1))
    lines = channel.getvalue().splitlines()
    assert len(lines) == 1 and isinstance(decode_line(lines[0]), Failed)


def test_each_rank_keeps_its_own_peak() -> None:
    job = Job(id="r", config=config(batch_size=4, num_processes=2), run_dir="/tmp/r", iters=1)
    history = RunHistory()
    for rank, peak in ((0, 1.0), (1, 3.0), (0, 2.0), (1, 2.5)):
        sample = MemorySample(
            rank=rank, rss_gb=1, active_gb=1, peak_gb=peak, cache_gb=0, system_total_gb=8, system_available_gb=4
        )
        apply_event(job, history, sample)
    assert job.metrics.rank_peak_memory_gb == [2.0, 3.0] and job.metrics.peak_memory_gb == 3.0
    assert "peak per process 2.00 / 3.00 GB" in job.snapshot().summary()


def test_ranks_get_what_mlx_launch_gives_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hostfile = tmp_path / "group.json"
    assert rank_env("ring", 1, 2, 5000, hostfile) == {"MLX_RANK": "1", "MLX_HOSTFILE": str(hostfile)}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    nccl = rank_env("nccl", 1, 2, 5000, hostfile)
    assert nccl["CUDA_VISIBLE_DEVICES"] == "3" and nccl["MLX_WORLD_SIZE"] == "2" and nccl["NCCL_PORT"] == "5000"
    assert "CUDA_VISIBLE_DEVICES" not in rank_env("nccl", 0, 1, 5000, hostfile)  # one process: the user's GPUs
    with pytest.raises(RuntimeError, match="names 2"):
        rank_env("nccl", 2, 3, 5000, hostfile)


def test_a_hostfile_is_checked_before_a_run_over_machines(tmp_path: Path) -> None:
    from trainer.planning.hostfile import read_hostfile
    from trainer.planning.preflight import _with_hosts

    hostfile = tmp_path / "hosts.json"
    with pytest.raises(ConfigError, match="is not a readable hostfile.*write one like"):
        read_hostfile(str(hostfile), "ring")
    hostfile.write_text(json.dumps([{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b"}]))
    with pytest.raises(ConfigError, match="host 'b' has no ips; the ring backend connects to IPs"):
        read_hostfile(str(hostfile), "ring")
    assert [h.ssh for h in read_hostfile(str(hostfile), "nccl")] == ["a", "b"]  # NCCL meets at the first host's IP
    hostfile.write_text(json.dumps({"hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}]}))
    with pytest.raises(ConfigError, match="lists 1 host"):
        read_hostfile(str(hostfile), "ring")
    hostfile.write_text(json.dumps([{"ssh": h, "ips": ["10.0.0.1"]} for h in "abc"]))
    assert _with_hosts(config(hosts=str(hostfile), batch_size=6), PathPolicy()).num_processes == 3
    with pytest.raises(ConfigError, match="num_processes is 2 but hosts .* lists 3 machines"):
        _with_hosts(config(hosts=str(hostfile), num_processes=2), PathPolicy())
    with pytest.raises(ConfigError, match="batch_size 4 does not split over num_processes 3"):
        _with_hosts(config(hosts=str(hostfile), batch_size=4), PathPolicy())


def test_rank_0_failing_after_a_rank_was_killed_names_the_kill_even_before_its_follower_ran(tmp_path: Path) -> None:
    """A CI run at full load once reported a killed rank as rank 0's own `backend` error: rank 0's collective failed
    first, and the thread that follows the dead rank had not run within the wait. The wait now polls the ranks too."""
    import signal
    import subprocess
    import sys

    from trainer.lifecycle.group import RankGroup

    failures: list[object] = []
    group = RankGroup(tmp_path, config(num_processes=2), lambda sample: None, failures.append)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.PIPE)
    group._children[1] = child  # started without its follow thread: as if that thread had not been scheduled yet
    try:
        child.send_signal(signal.SIGKILL)
        failure = group.wait_for_failure(5.0)
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
    assert failure is not None and failures == [failure]
    assert failure.kind == FailureKind.CRASHED and failure.message.startswith(
        "rank 1 of 2 was killed by signal SIGKILL"
    )
