"""Reading a run folder's files back: its events and the tail of its worker log."""

from __future__ import annotations

import shutil
from collections import deque
from pathlib import Path

from .events import Event, decode_line

TAIL_LINES = 20


def read_events(run_dir: Path) -> list[Event]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    events = []
    with path.open("rb") as lines:
        for line in lines:
            try:
                events.append(decode_line(line, older=True))
            except ValueError:  # a torn last line after a crash; everything before it still counts
                continue
    return events


def last_seq(run_dir: Path) -> int:
    """The highest `seq` in the run's events.jsonl (0 when none): a resumed run's next worker continues after it."""
    events = read_events(run_dir)
    return max((event.seq for event in events), default=0)


def disk_free(run_dir: Path) -> int | None:
    """Free bytes on the filesystem of the run folder (None when it cannot be told)."""
    try:
        return shutil.disk_usage(run_dir).free
    except OSError:
        return None


def stderr_tail(run_dir: Path, lines: int = TAIL_LINES) -> str:
    path = run_dir / "worker.log"
    if not path.exists():
        return ""
    with path.open(encoding="utf-8", errors="replace") as log:
        return "".join(deque(log, maxlen=lines)).strip()
