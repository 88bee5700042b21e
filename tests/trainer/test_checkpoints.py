"""Checkpoints are crash-safe: a process killed at any point of a save, a damaged file or a full disk never leaves a
checkpoint that loads wrong, and the previous one always still loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, user_namespaces
from trainer.errors import CheckpointWriteError
from trainer.lifecycle.checkpoints import (
    KEEP,
    STAGING_PREFIX,
    clean_staging,
    newest_verified,
    replace_file_atomically,
    write_checkpoint,
)

_WRITER = """
import os, signal, sys
from pathlib import Path
from trainer.lifecycle import checkpoints

root, step, kill_at, size = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

def die(*_args, **_kw):
    os.kill(os.getpid(), signal.SIGKILL)

def write_files(folder):
    (folder / "adapters.safetensors").write_bytes(os.urandom(size))
    if kill_at == "between-files":
        die()
    (folder / "optimizer.safetensors").write_bytes(os.urandom(size))

if kill_at == "before-manifest":
    checkpoints._write_synced = die
if kill_at == "before-rename":
    checkpoints.os.rename = die
try:
    checkpoints.write_checkpoint(root, step, write_files, config_hash="c", data_hash="d")
except checkpoints.CheckpointWriteError as exc:
    print(exc)
    sys.exit(3)
"""


def _write(root: Path, step: int, kill_at: str = "none", size: int = 4096, prefix: list[str] | None = None) -> int:
    """Write checkpoint `step` in another process, killed (SIGKILL) at `kill_at`; returns its exit status."""
    cmd = [*(prefix or []), sys.executable, "-c", _WRITER, str(root), str(step), kill_at, str(size)]
    return subprocess.run(cmd, env={"PYTHONPATH": str(REPO / "src")}, capture_output=True, check=False).returncode


@pytest.mark.parametrize("kill_at", ["between-files", "before-manifest", "before-rename"])
def test_a_save_killed_at_any_point_leaves_the_previous_checkpoint_and_no_staging_after_the_next_start(
    tmp_path: Path, kill_at: str
) -> None:
    assert _write(tmp_path, 5) == 0
    assert _write(tmp_path, 10, kill_at) == -9
    newest = newest_verified(tmp_path)
    assert newest is not None and newest.step == 5  # the half-written one is never a checkpoint
    assert list(tmp_path.glob(STAGING_PREFIX + "*"))  # what the kill left...
    assert clean_staging(tmp_path) == 1  # ...goes when the run's next worker starts
    assert not list(tmp_path.glob(STAGING_PREFIX + "*"))
    assert _write(tmp_path, 10) == 0
    assert (newest := newest_verified(tmp_path)) is not None and newest.step == 10


def test_a_damaged_or_unfinished_checkpoint_is_skipped_for_the_one_before(tmp_path: Path) -> None:
    for step in (5, 10, 15):
        assert _write(tmp_path, step) == 0
    damaged = tmp_path / "0000015" / "adapters.safetensors"
    data = bytearray(damaged.read_bytes())
    data[100] ^= 1  # one flipped bit
    damaged.write_bytes(bytes(data))
    (tmp_path / "0000010" / "manifest.json").unlink()
    newest = newest_verified(tmp_path)
    assert newest is not None and newest.step == 5


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    for step in range(1, 7):
        write_checkpoint(tmp_path, step, lambda f: (f / "a").touch(), config_hash="c", data_hash="d")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{s:07d}" for s in range(7 - KEEP, 7)]


def test_a_full_disk_is_a_named_error_and_the_previous_checkpoint_and_file_stay(tmp_path: Path) -> None:
    """A real ENOSPC: a 1 MB tmpfs mounted in a private mount namespace (no root needed where user namespaces are)."""
    if not user_namespaces():
        pytest.skip("user namespaces are not available here, so no small filesystem can be mounted")
    small = tmp_path / "small"
    small.mkdir()
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from trainer.errors import CheckpointWriteError
        from trainer.lifecycle.checkpoints import newest_verified, replace_file_atomically, write_checkpoint

        root = Path({str(small)!r})
        def files(size):
            return lambda f: (f / "adapters.safetensors").write_bytes(b"a" * size)
        write_checkpoint(root / "ck", 5, files(300_000), config_hash="c", data_hash="d")
        adapter = root / "adapters.safetensors"
        adapter.write_bytes(b"old")
        for attempt in ("checkpoint", "adapter"):
            try:
                if attempt == "checkpoint":
                    write_checkpoint(root / "ck", 10, files(2_000_000), config_hash="c", data_hash="d")
                else:
                    replace_file_atomically(adapter, lambda tmp: tmp.write_bytes(b"n" * 2_000_000))
            except CheckpointWriteError as exc:
                print(exc)
        assert newest_verified(root / "ck").step == 5
        assert adapter.read_bytes() == b"old"
        assert sorted(p.name for p in (root / "ck").iterdir()) == ["0000005"]  # no staging left behind
        """
    )
    mount = f'mount -t tmpfs -o size=1m tmpfs {small} && exec {sys.executable} -c "$0"'
    done = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", mount, script],
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    errors = done.stdout.splitlines()
    assert len(errors) == 2
    assert "could not save checkpoint 10 (writing the checkpoint files into" in errors[0]
    assert "No space left on device" in errors[0] and "previous checkpoints are intact" in errors[0]
    assert errors[1].startswith(f"could not write {small / 'adapters.safetensors'}: No space left on device")


def test_replacing_a_file_never_leaves_half_of_it(tmp_path: Path) -> None:
    target = tmp_path / "adapters.safetensors"
    target.write_bytes(b"old")

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        replace_file_atomically(target, fail)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
