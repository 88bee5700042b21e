"""The run store: one SQLite database (WAL) of run records, plus a folder per run.

runs/<id>/config.json    the accepted config (the record holds it; this is the worker's copy, written once)
runs/<id>/written.json   the files the run wrote outside its folder, with their SHA-256 (written.py)
runs/<id>/preflight.json what the checks found: the dataset summary and the memory prediction
runs/<id>/replan.json    a plan chosen again after the first steps (planning/replan.py), if one was
runs/<id>/events.jsonl   every event the worker sent, append-only
runs/<id>/worker.log     the worker's stdout and stderr (MLX-LM's own prints land here)
runs/<id>/adapters/      adapter_config.json and adapters.safetensors (as of the last checkpoint, then final)
runs/<id>/checkpoints/   crash-safe checkpoints a run resumes from (checkpoints.py)
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from ..errors import RunNotFound, StoreUnavailable
from ..planning.config import QLoRAConfig
from .jobs import TERMINAL_STATES, Job, JobError, JobState, Phase, RunMetrics

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    phase TEXT,
    config TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    iters INTEGER NOT NULL,
    iteration INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    pid INTEGER,
    adapter_path TEXT,
    metrics TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created_at);
CREATE TABLE IF NOT EXISTS leases (
    run_id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    process_started REAL NOT NULL,
    heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS scheduler (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    pid INTEGER NOT NULL,
    process_started REAL NOT NULL,
    heartbeat REAL NOT NULL
);
"""

_COLUMNS = (
    "id, state, phase, config, run_dir, iters, iteration, created_at, started_at, ended_at, pid, adapter_path, "
    "metrics, error, attempt"
)


#: the database file in a home folder
STORE_FILE = "runs.sqlite3"
#: seconds a write waits for another connection's lock before StoreUnavailable
BUSY_S = 10.0


class RunStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs_dir = root / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = root / STORE_FILE
        self._db = sqlite3.connect(self.db_path, timeout=BUSY_S, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        if "cancel_requested" not in columns:  # a home from before runs outlived their server
            self._db.execute("ALTER TABLE runs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0")
        if "attempt" not in columns:  # a home from before runs could be resumed
            self._db.execute("ALTER TABLE runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1")

    @property
    def db(self) -> sqlite3.Connection:
        """The store's connection, for the lease and scheduler tables (leases.py)."""
        return self._db

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._transaction()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def lock_wait(self, seconds: float) -> Iterator[None]:
        """Writes inside wait at most `seconds` for another connection's lock: for the runner's own bookkeeping on the
        event loop, which must not stall behind a database another process holds."""
        self._db.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")
        try:
            yield
        finally:
            self._db.execute(f"PRAGMA busy_timeout={int(BUSY_S * 1000)}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a database that cannot be written now raises StoreUnavailable (nothing changed)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise self._unavailable(exc) from exc
        try:
            yield self._db
        except BaseException as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise self._unavailable(exc) from exc
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: sqlite3.OperationalError) -> StoreUnavailable:
        return StoreUnavailable(
            f"the run database {self.db_path} cannot be written now ({exc}); nothing was changed. If another "
            "process holds it locked, or its disk is full or read-only, free it and try again"
        )

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def create(self, job: Job, preflight_json: str | None = None) -> None:
        """Write the run folder and its record together: either both exist afterwards or neither does. The record's
        config is the run's; config.json is its copy for the worker, written once here."""
        folder = Path(job.run_dir)
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise StoreUnavailable(f"could not create the run folder {folder}: {exc.strerror or exc}") from exc
        try:
            (folder / "config.json").write_text(job.config.model_dump_json(indent=2), encoding="utf-8")
            if preflight_json is not None:
                (folder / "preflight.json").write_text(preflight_json, encoding="utf-8")
            with self._transaction() as db:
                db.execute(f"INSERT INTO runs ({_COLUMNS}) VALUES ({', '.join('?' * 15)})", _row(job))
        except OSError as exc:  # a full or read-only disk: nothing of the run is left
            shutil.rmtree(folder, ignore_errors=True)
            raise StoreUnavailable(f"could not write the run folder {folder}: {exc.strerror or exc}") from exc
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def save(self, job: Job, *, if_state: JobState | None = None) -> bool:
        """Write the record; with `if_state`, only if the stored state is still that one (several servers may follow
        one run: the first to record its end wins). Returns whether it was written."""
        row = _row(job)
        query = (
            "UPDATE runs SET state=?, phase=?, iteration=?, started_at=?, ended_at=?, pid=?, adapter_path=?, "
            "metrics=?, error=? WHERE id=?"
        )
        values: tuple[object, ...] = (*row[1:3], row[6], *row[8:14], job.id)  # the columns the query names
        if if_state is not None:
            query += " AND state=?"
            values += (if_state.value,)
        with self._transaction() as db:
            return db.execute(query, values).rowcount == 1

    def requeue(self, job: Job, *, if_state: JobState) -> bool:
        """Record a resumed run (`job` already moved to queued, its next attempt) if it is still in `if_state`; its
        last cancel request is forgotten. Returns whether it was written."""
        row = _row(job)
        with self._transaction() as db:
            return (
                db.execute(
                    "UPDATE runs SET state=?, phase=NULL, started_at=NULL, ended_at=NULL, pid=NULL, error=NULL, "
                    "iteration=?, attempt=?, cancel_requested=0 WHERE id=? AND state=?",
                    (row[1], job.iteration, job.attempt, job.id, if_state.value),
                ).rowcount
                == 1
            )

    def claim_next(self, max_running: int) -> Job | None:
        """The oldest queued run, marked running, if fewer than `max_running` runs are running (across every server on
        this home); None otherwise. Atomic: two servers never claim the same run."""
        with self._transaction() as db:
            running = db.execute("SELECT COUNT(*) FROM runs WHERE state=?", (JobState.RUNNING.value,)).fetchone()[0]
            if running >= max_running:
                return None
            found = db.execute(
                f"SELECT {_COLUMNS} FROM runs WHERE state=? ORDER BY created_at, rowid LIMIT 1",
                (JobState.QUEUED.value,),
            ).fetchone()
            if found is None:
                return None
            job = _job(found)
            job.transition(JobState.RUNNING)
            db.execute("UPDATE runs SET state=?, started_at=? WHERE id=?", (job.state.value, job.started_at, job.id))
            return job

    def queued_before(self, run_id: str) -> int | None:
        """How many queued runs were accepted before this one (None: it is not queued)."""
        row = self._db.execute(
            "SELECT created_at, rowid FROM runs WHERE id=? AND state=?", (run_id, "queued")
        ).fetchone()
        if row is None:
            return None
        return int(
            self._db.execute(
                "SELECT COUNT(*) FROM runs WHERE state='queued' AND (created_at < ? OR (created_at = ? AND rowid < ?))",
                (row[0], row[0], row[1]),
            ).fetchone()[0]
        )

    def count(self, state: JobState) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM runs WHERE state=?", (state.value,)).fetchone()[0])

    def request_cancel(self, run_id: str) -> None:
        """Record that the user asked to cancel this run, so whichever server sees it stop records it cancelled."""
        with self._transaction() as db:
            db.execute("UPDATE runs SET cancel_requested=1 WHERE id=?", (run_id,))

    def cancel_requested(self, run_id: str) -> bool:
        row = self._db.execute("SELECT cancel_requested FROM runs WHERE id=?", (run_id,)).fetchone()
        return bool(row and row[0])

    def delete(self, run_id: str) -> bool:
        """Forget a run that has ended; False if it is not there or not ended (it changed meanwhile)."""
        ended = tuple(state.value for state in TERMINAL_STATES)
        with self._transaction() as db:
            cur = db.execute("DELETE FROM runs WHERE id=? AND state IN (?, ?, ?)", (run_id, *ended))
            db.execute("DELETE FROM leases WHERE run_id=?", (run_id,))
            return cur.rowcount == 1

    def get(self, run_id: str) -> Job:
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM runs WHERE id=?", (run_id,))
        found = cur.fetchone()
        if found is None:
            raise RunNotFound(run_id)
        return _job(found)

    def list_runs(self, state: JobState | None = None, limit: int = 50) -> list[Job]:
        if state is None:
            cur = self._db.execute(f"SELECT {_COLUMNS} FROM runs ORDER BY created_at DESC LIMIT ?", (limit,))
        else:
            cur = self._db.execute(
                f"SELECT {_COLUMNS} FROM runs WHERE state=? ORDER BY created_at DESC LIMIT ?", (state.value, limit)
            )
        return [_job(r) for r in cur.fetchall()]

    def live(self) -> list[Job]:
        cur = self._db.execute(
            f"SELECT {_COLUMNS} FROM runs WHERE state IN (?, ?) ORDER BY created_at",
            (JobState.QUEUED.value, JobState.RUNNING.value),
        )
        return [_job(r) for r in cur.fetchall()]


def _row(job: Job) -> tuple[object, ...]:
    return (
        job.id,
        job.state.value,
        job.phase.value if job.phase else None,
        job.config.model_dump_json(),
        job.run_dir,
        job.iters,
        job.iteration,
        job.created_at,
        job.started_at,
        job.ended_at,
        job.pid,
        job.adapter_path,
        job.metrics.model_dump_json(),
        job.error.model_dump_json() if job.error else None,
        job.attempt,
    )


def _job(row: tuple[object, ...]) -> Job:
    (
        id_,
        state,
        phase,
        config,
        run_dir,
        iters,
        iteration,
        created,
        started,
        ended,
        pid,
        adapter,
        metrics,
        error,
        attempt,
    ) = row
    return Job(
        id=str(id_),
        config=QLoRAConfig.model_validate_json(str(config)),
        run_dir=str(run_dir),
        iters=int(str(iters)),
        state=JobState(str(state)),
        phase=Phase(str(phase)) if phase else None,
        created_at=float(str(created)),
        started_at=float(str(started)) if started is not None else None,
        ended_at=float(str(ended)) if ended is not None else None,
        iteration=int(str(iteration)),
        pid=int(str(pid)) if pid is not None else None,
        adapter_path=str(adapter) if adapter is not None else None,
        metrics=RunMetrics.model_validate_json(str(metrics)),
        error=JobError.model_validate_json(str(error)) if error else None,
        attempt=int(str(attempt)),
    )
