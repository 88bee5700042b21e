"""The first minutes with `python -m trainer`: --home anywhere, the real default in --help, and a read that creates
nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from trainer.settings import default_home


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, timeout=60)


def test_home_is_taken_before_or_after_the_subcommand_and_a_read_creates_nothing(tmp_path: Path) -> None:
    home = tmp_path / "not-yet"
    for args in (("--home", str(home), "list"), ("list", "--home", str(home))):
        done = cli(*args)
        assert done.returncode == 0 and f"no runs yet in {home}" in done.stderr, done.stderr
    missing = cli("status", "abc", "--home", str(home))
    assert missing.returncode == 2 and "holds no runs yet; pass --home" in missing.stderr
    assert not home.exists()


def test_help_shows_the_real_default_home() -> None:
    done = cli("--help")
    assert str(default_home()) in done.stdout.replace("\n", "").replace(" ", "")  # argparse wraps long lines
    assert "default: None" not in done.stdout


def test_no_pytorch_notice_when_the_tokenizer_loads(tmp_path: Path) -> None:
    """transformers says "PyTorch was not found" on import; nothing here needs PyTorch, so the CLI says nothing."""
    assert cli("make-tiny", str(tmp_path / "tiny")).returncode == 0
    source = tmp_path / "repo"
    source.mkdir()
    (source / "a.py").write_text('def f(x):\n    """Twice x."""\n    return 2 * x\n')
    done = cli("build-dataset", str(source), str(tmp_path / "out"), "--model", str(tmp_path / "tiny" / "model"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "PyTorch was not found" not in done.stderr
