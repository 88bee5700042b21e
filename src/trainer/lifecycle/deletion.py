"""Deleting an ended run: its record, its folder and its adapter, with nothing left half-deleted.

The folder is first renamed aside (atomic), then the record deleted, then the files removed: a crash in between
leaves either the whole run or a `.deleting-*` folder that the next deletion sweeps, never a record without files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import BaseModel

from ..errors import RunConflict
from ..planning.model_inventory import folder_size
from .store import RunStore

ASIDE_PREFIX = ".deleting-"
ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")


class DeletedRun(BaseModel):
    run_id: str
    removed: list[str]
    freed_gb: float


def _adapter_outside(adapter: str | None, folder: Path) -> Path | None:
    """A run's adapter written outside its folder (adapter_dir), if it holds only what a run writes there."""
    if adapter is None:
        return None
    path = Path(adapter)
    if path.resolve().is_relative_to(folder.resolve()) or not path.is_dir():
        return None
    if not all((path / name).is_file() for name in ADAPTER_FILES):
        return None  # not (or no longer) an adapter folder: leave it alone
    return path


def delete_run(store: RunStore, run_id: str) -> DeletedRun:
    job = store.get(run_id)
    if not job.state.terminal:
        raise RunConflict(f"run {run_id} is {job.state.value}: stop it with cancel_run first, then delete it")
    folder = store.run_dir(run_id)
    adapter = _adapter_outside(job.adapter_path, folder)
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
    removed, freed = [], 0
    for path in (aside, adapter):
        if path is not None and path.exists():
            freed += folder_size(path)
            shutil.rmtree(path)
            removed.append(str(folder if path == aside else path))
    for leftover in folder.parent.glob(ASIDE_PREFIX + "*"):  # an earlier deletion cut short
        shutil.rmtree(leftover, ignore_errors=True)
    return DeletedRun(run_id=run_id, removed=removed, freed_gb=round(freed / 1e9, 4))
