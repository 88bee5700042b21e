"""Whether our CPU decode kernels beat MLX's own operations on this machine: measured once, when they are built.

On some CPUs (a 2-core Intel Xeon, in issue 13) the kernels decoded slower than the fallback they replace. So the
build command (`python -m trainer.engine.decode_kernel`, run by the set-up scripts) also decodes a random model of
SmolLM2's shape both ways, in fresh processes, and records the numbers next to the kernel; `decode_kernel.load`
uses the kernel only where it was at least as fast.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from ..environment.preload import preload_env

log = logging.getLogger(__name__)
CHOICE_FILE = "choice.json"
#: set in the probes, so the one with the kernel on measures the kernel whatever an earlier choice said
IGNORE_ENV = "MCP_LOCAL_DECODE_CHOICE"
PROBE_DIMS = {
    "model_type": "qwen2",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
_PROBE = r"""
import json, sys, time
import mlx.core as mx, mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.models import qwen2
from trainer.engine.fastpath import apply_fast_path
dims = json.loads(sys.argv[1])
mx.random.seed(0)
model = qwen2.Model(qwen2.ModelArgs.from_dict(dims))
nn.quantize(model, group_size=64, bits=4)
mx.eval(model.parameters())
apply_fast_path(model, True)
prompt = mx.random.randint(0, dims["vocab_size"], (16,), key=mx.random.key(1))
best = 0.0
for _ in range(2):
    steps = generate_step(prompt, model, max_tokens=24)
    next(steps)
    start = time.perf_counter()
    count = sum(1 for _ in steps)
    best = max(best, count / (time.perf_counter() - start))
open(sys.argv[2], "w").write(json.dumps({"tok_s": best}))
"""


#: a machine busier than this (1-minute load average per core) measures the two paths unevenly: a CI run at load 5
#: on 2 cores once measured the kernels at 2.4 tokens/s against MLX's 7.6, where calm it measures 36.6 against 7.3
BUSY_LOAD_PER_CORE = 1.0
#: a provisional choice is measured again in the background at most this often (every server start on a machine that
#: is only calm between jobs, such as a test suite's, would otherwise measure again)
RECHECK_AFTER_S = 3600.0


def load_per_core() -> float:
    """The 1-minute load average per core (0 where the system does not say)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


class DecodeChoice(BaseModel):
    kernel_tok_s: float
    mlx_tok_s: float
    #: the libraries and OpenBLAS core MLX's own path ran with (a BLAS installed later changes the answer)
    measured_under: str = ""
    #: the load per core when measured: over BUSY_LOAD_PER_CORE the figures are provisional (None: recorded before
    #: the load was, so measured again on a calm machine)
    load_per_core: float | None = None
    #: when it was measured (seconds since the epoch; None: recorded before this field)
    measured_at: float | None = None

    @property
    def provisional(self) -> bool:
        return self.load_per_core is not None and self.load_per_core > BUSY_LOAD_PER_CORE

    @property
    def use_kernel(self) -> bool:
        # a measurement on a busy machine never turns the kernels off: it is taken again when the machine is calm
        return self.provisional or self.kernel_tok_s >= self.mlx_tok_s


def _probe_env() -> dict[str, str]:
    # as the server and workers run: with their preloads (OpenBLAS drives MLX's own float32 path)
    return preload_env(dict(os.environ))


def _setting(env: dict[str, str]) -> str:
    return f"LD_PRELOAD={env.get('LD_PRELOAD', '')} OPENBLAS_CORETYPE={env.get('OPENBLAS_CORETYPE', '')}"


def _probe(kernel: bool) -> float:
    env = {**_probe_env(), IGNORE_ENV: "ignore", "MCP_LOCAL_DECODE_KERNEL": "on" if kernel else "off"}
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "probe.json"
        command = [sys.executable, "-c", _PROBE, json.dumps(PROBE_DIMS), str(result)]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"decode probe failed: {done.stderr[-500:]}")
        return float(json.loads(result.read_text(encoding="utf-8"))["tok_s"])


def measure(kernel_dir: Path) -> DecodeChoice:
    """Decode both ways and record the result next to the kernel; where the kernels lose, both ways once more (each
    its best), so that a moment's load on one probe does not decide."""
    load = load_per_core()
    kernel, own = _probe(True), _probe(False)
    if kernel < own:
        kernel, own = max(kernel, _probe(True)), max(own, _probe(False))
        load = max(load, load_per_core())
    choice = DecodeChoice(
        kernel_tok_s=round(kernel, 1),
        mlx_tok_s=round(own, 1),
        measured_under=_setting(_probe_env()),
        load_per_core=round(load, 2),
        measured_at=round(time.time(), 1),
    )
    (kernel_dir / CHOICE_FILE).write_text(choice.model_dump_json(), encoding="utf-8")
    return choice


def recorded(kernel_dir: Path) -> DecodeChoice | None:
    """The measurement made when the kernel was built (None: none made, or it is being measured now)."""
    if os.environ.get(IGNORE_ENV) == "ignore":
        return None
    try:
        return DecodeChoice.model_validate_json((kernel_dir / CHOICE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stale(choice: DecodeChoice, busy_now: bool | None = None, recheck_after_s: float = RECHECK_AFTER_S) -> bool:
    """Whether to measure again: the choice was measured under other libraries than this machine now preloads, or on
    a busy machine (or at an unrecorded load) at least `recheck_after_s` ago and this one is calm now (a busy
    machine keeps it rather than measure under load again)."""
    if choice.measured_under != _setting(_probe_env()):
        return True
    if not (choice.provisional or choice.load_per_core is None):
        return False
    if choice.measured_at is not None and time.time() - choice.measured_at < recheck_after_s:
        return False
    if busy_now is None:
        busy_now = load_per_core() > BUSY_LOAD_PER_CORE
    return not busy_now
