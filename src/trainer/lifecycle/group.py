"""A data-parallel run's process group, kept by rank 0: the worker the runner started.

Rank 0 starts ranks 1..N-1 as its own children with the variables MLX's launcher (`mlx.launch`) gives each rank, so
`mx.distributed.init` joins them; it passes their memory samples and failures on, and ends the whole group when any
rank dies or no step ends within the timeout. Only rank 0 writes the run's events, checkpoints and adapter; the other
ranks write samples and a failure to a pipe to it. They ignore SIGTERM and stop when rank 0 stops them, so a cancel
never leaves one rank waiting in a collective for one that already left; and they exit when rank 0 is gone.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ..entrypoints import WORKER
from ..planning.config import QLoRAConfig
from ..planning.device import group_backend
from ..planning.hostfile import Host, read_hostfile
from .events import Failed, MemorySample, decode_line
from .jobs import FailureKind
from .tracking import describe_exit

log = logging.getLogger(__name__)
RANK_ENV = "MLX_RANK"
HOSTFILE_ENV = "MLX_HOSTFILE"
#: seconds without a step (or any report) after which a group counts as hung; tests shorten it
TIMEOUT_ENV = "MCP_LOCAL_GROUP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
#: before the first step, the timeout is this many times longer
LOADING_TIMEOUT_FACTOR = 3
LOCALHOST = "127.0.0.1"
WORKER_MODULE = WORKER
#: a rank on another machine reads its run config from here (it has no run folder)
RUN_CONFIG_ENV = "MCP_LOCAL_RUN_CONFIG"
#: the variables a rank on another machine gets from rank 0's environment (besides its own)
FORWARDED_PREFIXES = ("MLX_", "MCP_LOCAL_", "NCCL_", "HF_")
FORWARDED = frozenset({"PYTHONPATH", "TRAINER_BACKEND"})
#: how long a finished rank 0 waits for the others to end on their own before killing them
FINISH_GRACE_S = 10.0


@dataclass(frozen=True)
class RankFailure:
    rank: int
    kind: FailureKind
    message: str


def free_ports(count: int) -> list[int]:
    """Ports free on the loopback now (held together while chosen, so they differ)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((LOCALHOST, 0))
        return [s.getsockname()[1] for s in sockets]


def rank_env(
    backend: str, rank: int, size: int, port: int, hostfile: Path, master: str = LOCALHOST, one_host: bool = True
) -> dict[str, str]:
    """What `mlx.launch` sets for one rank: the ring reads its peers from a hostfile, NCCL meets at rank 0's address
    and port; on one host, one GPU per rank."""
    env = {RANK_ENV: str(rank)}
    if backend == "ring":
        return env | {HOSTFILE_ENV: str(hostfile)}
    env |= {"MLX_WORLD_SIZE": str(size), "NCCL_HOST_IP": master, "NCCL_PORT": str(port)}
    if size > 1 and one_host:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(size)]
        if rank >= len(devices):
            raise RuntimeError(f"num_processes is {size} but CUDA_VISIBLE_DEVICES={visible!r} names {len(devices)}")
        env["CUDA_VISIBLE_DEVICES"] = devices[rank]
    return env


def rank_command(run_dir: Path, rank: int) -> list[str]:
    """A rank's worker: it writes its samples and failure to its stdout, its own prints going to stderr (it holds
    no lease: rank 0's is the run's)."""
    return [sys.executable, "-m", WORKER_MODULE, str(run_dir), "--rank", str(rank), "--channel-fd", "1"]


def remote_command(host: Host, command: list[str], env: dict[str, str], ring: str | None) -> list[str]:
    """`command` on another machine over SSH, as mlx.launch runs one there: the same working folder and Python (the
    same paths on every machine), the rank's variables, the ring's hostfile written to a temporary file there."""
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) or k in FORWARDED}
    variables = {k: v for k, v in {**forwarded, **env}.items() if k not in (HOSTFILE_ENV, RANK_ENV)} | {
        RANK_ENV: env[RANK_ENV]
    }
    script = [f"cd {shlex.quote(os.getcwd())}"] + [f"export {k}={shlex.quote(v)}" for k, v in variables.items()]
    if ring is not None:
        script += [
            "hostfile=$(mktemp)",
            f"printf %s {shlex.quote(ring)} > $hostfile",
            f"export {HOSTFILE_ENV}=$hostfile",
        ]
    script.append(f"exec {shlex.join(command)}")
    return ["ssh", "-o", "BatchMode=yes", "-o", "LogLevel=QUIET", "--", host.ssh, "; ".join(script)]


def group_timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)


class RankGroup:
    """Ranks 1..N-1 of a run, started and watched from rank 0: `start()`, `beat()` at each step, `close()`."""

    def __init__(
        self,
        run_dir: Path,
        config: QLoRAConfig,
        on_sample: Callable[[MemorySample], None],
        on_failure: Callable[[RankFailure], None],
    ) -> None:
        self.run_dir, self.config = run_dir, config
        self.on_sample, self.on_failure = on_sample, on_failure
        self.backend = group_backend(config.backend)
        self.timeout_s = group_timeout_s()
        self.failure: RankFailure | None = None
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._closing = threading.Event()
        self._last_beat = time.monotonic()
        self._failed = threading.Event()
        self._lock = threading.Lock()
        self._stepping = False

    def start(self) -> None:
        """Set rank 0's own variables (before MLX joins the group) and start the other ranks."""
        size = self.config.num_processes
        hosts = read_hostfile(self.config.hosts, self.backend) if self.config.hosts else None
        ports = free_ports(size)  # free here; on other machines, ports free here are assumed free too
        ips = [h.ips[0] if h.ips else LOCALHOST for h in hosts] if hosts else [LOCALHOST] * size
        ring = json.dumps([[f"{ip}:{port}"] for ip, port in zip(ips, ports, strict=True)])
        hostfile = self.run_dir / "group.json"
        hostfile.write_text(ring, encoding="utf-8")

        def env_of(rank: int) -> dict[str, str]:
            return rank_env(self.backend, rank, size, ports[0], hostfile, master=ips[0], one_host=hosts is None)

        os.environ.update(env_of(0))
        log.info("starting %d processes with the %s backend%s", size, self.backend, " over SSH" if hosts else "")
        for rank in range(1, size):
            env = env_of(rank)
            command = rank_command(self.run_dir, rank)
            if hosts is None:
                self._start_rank(rank, command, {**os.environ, **env})
            else:
                env[RUN_CONFIG_ENV] = self.config.model_dump_json()  # the other machine has no run folder
                ring_text = ring if self.backend == "ring" else None
                self._start_rank(rank, remote_command(hosts[rank], command, env, ring_text), dict(os.environ))
        threading.Thread(target=self._watch_progress, name="group-timeout", daemon=True).start()

    def _start_rank(self, rank: int, command: list[str], env: dict[str, str]) -> None:
        # stdout: the rank's channel; stderr: rank 0's, the run's worker.log; the same process group, so the
        # server's kill of the worker's group reaches it
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env)
        self._children[rank] = child
        threading.Thread(target=self._follow, args=(rank, child), name=f"rank-{rank}", daemon=True).start()

    def _follow(self, rank: int, child: subprocess.Popen[bytes]) -> None:
        """A rank's samples and failure, then its end: an end before rank 0 closes the group fails the run."""
        reported: Failed | None = None
        assert child.stdout is not None
        with child.stdout as channel:
            for line in channel:
                try:
                    event = decode_line(line)
                except ValueError:
                    continue
                if isinstance(event, MemorySample):
                    self.on_sample(event.model_copy(update={"rank": rank}))
                elif isinstance(event, Failed):
                    reported = event
        code = child.wait()
        if self._closing.is_set() or (code == 0 and reported is None):  # ended with rank 0, or its steps all done
            return
        if reported is not None:
            failure = RankFailure(rank, reported.kind, f"rank {rank} failed: {reported.message}")
        else:
            failure = self._crashed(rank, code)
        self._fail(failure)

    def _crashed(self, rank: int, code: int) -> RankFailure:
        return RankFailure(
            rank, FailureKind.CRASHED, f"rank {rank} of {self.config.num_processes} {describe_exit(code)}"
        )

    def _killed_rank(self) -> RankFailure | None:
        """A rank killed by a signal (it could report nothing), seen by polling: its follow thread may not have run
        yet on a loaded machine."""
        for rank, child in self._children.items():
            code = child.poll()
            if code is not None and code < 0:
                return self._crashed(rank, code)
        return None

    def _watch_progress(self) -> None:
        while not self._closing.wait(1.0):
            idle = time.monotonic() - self._last_beat
            # loading (and quantizing) a large model before the first step may take longer than a step ever does
            if idle > (self.timeout_s if self._stepping else LOADING_TIMEOUT_FACTOR * self.timeout_s):
                self._fail(
                    RankFailure(
                        0,
                        FailureKind.BACKEND,
                        f"no step of the {self.config.num_processes}-process group ended in {idle:.0f} s: a rank "
                        f"hung (the timeout is {self.timeout_s:.0f} s, {TIMEOUT_ENV})",
                    )
                )
                return

    def _fail(self, failure: RankFailure) -> None:
        with self._lock:  # the rank threads and the timeout may fail the group at once: the first one counts
            if self._failed.is_set():
                return
            self.failure = failure
            self._failed.set()
        log.error("%s", failure.message)
        self.on_failure(failure)

    def beat(self, stepping: bool = False) -> None:
        """Rank 0 reported something (`stepping`: about a training step or evaluation)."""
        self._last_beat = time.monotonic()
        self._stepping = self._stepping or stepping

    def wait_for_failure(self, seconds: float) -> RankFailure | None:
        """A rank's failure, waiting up to `seconds` for one (rank 0's own error may be the symptom of it)."""
        deadline = time.monotonic() + seconds
        while not self._failed.wait(0.1) and time.monotonic() < deadline:
            killed = self._killed_rank()
            if killed is not None:
                self._fail(killed)
        return self.failure

    def close(self, grace_s: float = 0.0) -> None:
        """End the other ranks: wait up to `grace_s` for them to exit on their own, then kill them."""
        self._closing.set()
        deadline = time.monotonic() + grace_s
        for child in self._children.values():
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for child in self._children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
