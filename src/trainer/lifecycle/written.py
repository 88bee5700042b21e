"""What a run wrote outside its own folder (its `adapter_dir`), recorded as it is written: deleting the run removes
exactly those files, when their content is still what the run wrote, and only folders the run created and left
empty. A user's folder is never removed on a guess.

runs/<id>/written.json   {"created_dirs": [...], "files": {path: sha256}}, replaced atomically on each change
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from pydantic import BaseModel, ValidationError

log = logging.getLogger(__name__)
WRITTEN = "written.json"
_CHUNK = 1 << 20


class WrittenFiles(BaseModel):
    created_dirs: list[str] = []  # outermost first
    files: dict[str, str] = {}  # path -> SHA-256 of the content this run wrote last


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_written(run_dir: Path) -> WrittenFiles | None:
    """The record, or None for a run that has none (recorded before this existed, or never wrote outside)."""
    try:
        return WrittenFiles.model_validate_json((run_dir / WRITTEN).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:  # unreadable: treat as no record, so nothing outside is touched
        log.warning("cannot read %s: %s", run_dir / WRITTEN, exc)
        return None


class WrittenLog:
    """The worker's side: create the adapter folder and note each adapter file once it is written."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.record = read_written(run_dir) or WrittenFiles()  # a resumed run adds to its earlier attempts'

    def make_folder(self, folder: Path) -> None:
        """mkdir -p, noting each folder that did not exist (a folder that did is the user's)."""
        missing = []
        probe = folder
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        folder.mkdir(parents=True, exist_ok=True)
        if missing:
            self.record.created_dirs.extend(str(p) for p in reversed(missing) if str(p) not in self.record.created_dirs)
            self._save()

    def note(self, folder: Path, names: tuple[str, ...]) -> None:
        """Record the content of `folder/name` for each name present (called right after the run wrote them)."""
        changed = False
        for name in names:
            path = folder / name
            if path.is_file():
                self.record.files[str(path)] = file_sha256(path)
                changed = True
        if changed:
            self._save()

    def _save(self) -> None:
        target = self.run_dir / WRITTEN
        staging = target.with_name(f".{WRITTEN}.{os.getpid()}")
        staging.write_text(self.record.model_dump_json(indent=1), encoding="utf-8")
        os.replace(staging, target)


def remove_written(record: WrittenFiles, adapter_dir: Path) -> tuple[list[str], list[str], int]:
    """Remove what the record names and still holds the run's content; returns (removed, kept with reasons, bytes).
    Only inside the run's `adapter_dir` (and folders above it that the run created): a record naming anything else
    is not the run's own, whatever it says."""
    removed: list[str] = []
    kept: list[str] = []
    freed = 0
    for name, digest in record.files.items():
        path = Path(name)
        if path.parent != adapter_dir:
            kept.append(f"{path} (not in the run's adapter_dir)")
            continue
        if not path.is_file() or path.is_symlink():
            continue
        if file_sha256(path) != digest:
            kept.append(f"{path} (changed since the run wrote it)")
            continue
        freed += path.stat().st_size
        path.unlink()
        removed.append(str(path))
    for name in reversed(record.created_dirs):  # innermost first; a folder holding anything else stays
        folder = Path(name)
        if not adapter_dir.is_relative_to(folder) or not folder.is_dir() or folder.is_symlink():
            continue
        if any(folder.iterdir()):
            kept.append(f"{folder} (holds files the run did not write)")
            continue
        folder.rmdir()
        removed.append(str(folder))
    return removed, kept, freed
