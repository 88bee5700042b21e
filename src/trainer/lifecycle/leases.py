"""Who is alive, recorded in the store: each worker's lease on its run, and the one server that starts queued runs.

A process is named by its pid *and* its start time, so a pid reused by another process never passes for the worker.
A worker renews its lease every `HEARTBEAT_S`; any server on the same home can tell from the lease whether a run is
still being trained, and follow it, whichever server started it. The scheduler row works the same way for servers:
the first to find it empty or stale takes it, so one server at a time starts queued runs.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from .store import RunStore

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0
#: a lease or scheduler row not renewed for this long belongs to a process that is stopped or hung
STALE_S = 10.0


def process_started(pid: int) -> float | None:
    """When the process `pid` started (None if there is none)."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def same_process_alive(pid: int, started: float) -> bool:
    found = process_started(pid)
    if found is None or abs(found - started) > 0.01:
        return False
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@dataclass(frozen=True)
class Lease:
    run_id: str
    pid: int
    process_started: float
    heartbeat: float

    def alive(self) -> bool:
        """The worker process still exists (a stale heartbeat alone means hung, not gone)."""
        return same_process_alive(self.pid, self.process_started)


def read_lease(store: RunStore, run_id: str) -> Lease | None:
    row = store.db.execute(
        "SELECT run_id, pid, process_started, heartbeat FROM leases WHERE run_id=?", (run_id,)
    ).fetchone()
    return Lease(str(row[0]), int(row[1]), float(row[2]), float(row[3])) if row else None


class LeaseKeeper:
    """The worker's side: takes its run's lease, renews it on a thread, and drops it when the worker is done."""

    def __init__(self, db_path: Path, run_id: str) -> None:
        self._db = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
        self._run_id = run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="lease", daemon=True)
        started = process_started(os.getpid())
        assert started is not None
        self._started = started

    def _write(self) -> None:
        self._db.execute(
            "INSERT INTO leases (run_id, pid, process_started, heartbeat) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(run_id) DO UPDATE SET pid=excluded.pid, process_started=excluded.process_started, "
            "heartbeat=excluded.heartbeat",
            (self._run_id, os.getpid(), self._started, time.time()),
        )

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except sqlite3.Error as exc:  # a busy or full database: the next beat tries again
                log.warning("could not renew the lease of run %s: %s", self._run_id, exc)

    def __enter__(self) -> LeaseKeeper:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._db.execute("DELETE FROM leases WHERE run_id=?", (self._run_id,))
        except sqlite3.Error as error:
            log.warning("could not drop the lease of run %s: %s", self._run_id, error)
        self._db.close()


class SchedulerElection:
    """The server's side: whether this server is the one that starts queued runs now."""

    def __init__(self, store: RunStore, holder: str) -> None:
        self._store = store
        self.holder = holder
        started = process_started(os.getpid())
        assert started is not None
        self._started = started

    def hold(self) -> bool:
        """Take or renew the scheduler row; False while another live server holds it."""
        now = time.time()
        with self._store.transaction() as db:
            row = db.execute("SELECT holder, pid, process_started, heartbeat FROM scheduler WHERE id=1").fetchone()
            if row is not None and row[0] != self.holder:
                holder_alive = same_process_alive(int(row[1]), float(row[2]))
                if holder_alive and now - float(row[3]) < STALE_S:
                    return False
            db.execute(
                "INSERT INTO scheduler (id, holder, pid, process_started, heartbeat) VALUES (1, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET holder=excluded.holder, pid=excluded.pid, "
                "process_started=excluded.process_started, heartbeat=excluded.heartbeat",
                (self.holder, os.getpid(), self._started, now),
            )
        return True

    def release(self) -> None:
        with self._store.transaction() as db:
            db.execute("DELETE FROM scheduler WHERE id=1 AND holder=?", (self.holder,))
