"""Deleting an ended run: its record, its folder, and of its adapter_dir only the files it wrote there.

The folder is first renamed aside (atomic), then the record deleted, then the files removed: a crash in between
leaves either the whole run or a `.deleting-*` folder that the next deletion sweeps, never a record without files.
Outside its folder a run removes only what `written.json` records it wrote and still holds that content (written.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import BaseModel

from ..errors import RunConflict
from ..planning.model_inventory import folder_size
from .store import RunStore
from .written import read_written, remove_written

ASIDE_PREFIX = ".deleting-"


class DeletedRun(BaseModel):
    run_id: str
    removed: list[str]
    kept: list[str] = []  # what the run's adapter_dir holds that was left alone, and why
    freed_gb: float


def delete_run(store: RunStore, run_id: str) -> DeletedRun:
    job = store.get(run_id)
    if not job.state.terminal:
        raise RunConflict(f"run {run_id} is {job.state.value}: stop it with cancel_run first, then delete it")
    folder = store.run_dir(run_id)
    record = read_written(folder)
    outside = job.adapter_path is not None and not Path(job.adapter_path).resolve().is_relative_to(folder.resolve())
    aside = folder.with_name(ASIDE_PREFIX + run_id)
    if folder.exists():
        folder.rename(aside)
    try:
        if not store.delete(run_id):
            raise RunConflict(f"run {run_id} changed while being deleted; look at it again with run_status")
    except BaseException:
        if aside.exists():
            aside.rename(folder)
        raise
    removed: list[str] = []
    kept: list[str] = []
    freed = 0
    if aside.exists():  # the run's folder: the store created it (never an existing one) and only runs write there
        freed += folder_size(aside)
        shutil.rmtree(aside)
        removed.append(str(folder))
    if record is not None and job.config.adapter_dir is not None:
        written, kept, freed_outside = remove_written(record, Path(job.config.adapter_dir))
        removed += written
        freed += freed_outside
    elif outside:
        kept.append(f"{job.adapter_path} (no record of what the run wrote there; delete it yourself if it is yours)")
    for leftover in folder.parent.glob(ASIDE_PREFIX + "*"):  # an earlier deletion cut short
        shutil.rmtree(leftover, ignore_errors=True)
    return DeletedRun(run_id=run_id, removed=removed, kept=kept, freed_gb=round(freed / 1e9, 4))
