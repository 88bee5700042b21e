"""The sandbox for model-written code: what passes passes, and it blocks the network, writes outside its folder,
new processes and over-long runs, and sees none of the caller's secrets."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from trainer.results.sandbox import run_command_sandboxed, run_sandboxed


def test_a_passing_and_a_failing_program() -> None:
    assert run_sandboxed("assert sorted([3, 1, 2]) == [1, 2, 3]").outcome == "passed"
    failed = run_sandboxed("assert 1 == 2, 'wrong'")
    assert failed.outcome == "failed" and "AssertionError: wrong" in failed.output


def test_the_network_is_blocked() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')"
        result = run_sandboxed(program)
        assert result.outcome == "blocked" and "sandbox: socket" in result.output
        with pytest.raises(TimeoutError):
            server.accept()  # nothing reached the listener


def test_writes_stay_in_its_folder(tmp_path: Path) -> None:
    outside = tmp_path / "escaped.txt"
    for program in (
        f"open({str(outside)!r}, 'w').write('x')",
        f"import os\nos.open({str(outside)!r}, os.O_CREAT | os.O_WRONLY)",
        f"import pathlib\npathlib.Path({str(outside)!r}).write_text('x')",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        "import os\nos.rename('program.py', '/tmp/moved.py')",
    ):
        result = run_sandboxed(program)
        assert result.outcome == "blocked", (program, result.output)
    assert not outside.exists() and tmp_path.is_dir()
    inside = "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'"
    assert run_sandboxed(inside).outcome == "passed"


def test_no_new_processes() -> None:
    for program in ("import os\nos.system('true')", "import subprocess\nsubprocess.run(['true'])"):
        assert run_sandboxed(program).outcome == "blocked"


@pytest.mark.slow  # waits out the time limit
def test_over_long_runs_are_stopped() -> None:
    for program in ("while True:\n    pass", "import time\ntime.sleep(60)"):
        tic = time.monotonic()
        result = run_sandboxed(program, timeout_s=2)
        assert result.outcome == "timed_out" and time.monotonic() - tic < 10


def test_memory_is_limited_and_secrets_are_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_sandboxed("x = bytearray(8 << 30)", memory_mb=512).outcome == "failed"  # MemoryError, not the machine's
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    program = "import os\nassert 'HF_TOKEN' not in os.environ and os.environ['HOME'] == os.getcwd(), dict(os.environ)"
    assert run_sandboxed(program).outcome == "passed"
    assert os.environ["HF_TOKEN"] == "hf_secret"


def test_programs_start_without_fork_handlers(tmp_path: Path) -> None:
    """A fork runs every library's fork handlers: in an evaluation that had used MLX, OpenBLAS's (0.3.21) deadlocked
    there and the evaluation hung. The sandbox starts its processes without one (vfork: no `preexec_fn`), and still
    applies its limits through a launcher."""
    forks: list[int] = []
    os.register_at_fork(before=lambda: forks.append(1))  # runs on any fork that could run the C handlers too
    assert run_sandboxed("print('hi')").passed
    assert run_command_sandboxed([sys.executable, "-c", "print('hi')"], tmp_path).passed
    assert forks == []
    missing = run_command_sandboxed(["no-such-command-here"], tmp_path)
    assert missing.outcome == "failed" and "cannot run 'no-such-command-here'" in missing.output
