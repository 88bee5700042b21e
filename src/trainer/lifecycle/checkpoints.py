"""Crash-safe checkpoints: the folders a run can be resumed from, and the fingerprints that say it is the same run.

runs/<id>/checkpoints/0000040/   adapters.safetensors, optimizer.safetensors, state.json, manifest.json

A checkpoint is written into a staging folder, each file fsynced, then the manifest (every file's size and SHA-256)
written last, the folder renamed into place and its parent fsynced: a crash at any point leaves either the previous
checkpoints alone or a complete new one, and a folder whose manifest does not verify is never loaded. Staging
folders a crash left behind are removed when the next worker of the run starts. No MLX here: the engine writes the
files (`write_files`), this module makes them durable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import CheckpointWriteError
from ..planning.config import QLoRAConfig

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
#: verified checkpoints kept per run; older ones are removed once a newer one is in place
KEEP = 3
#: config fields that change how a run is watched, not what it computes: a resume may differ in them
_NOT_TRAINING = frozenset({"memory_budget_gb", "allow_over_budget", "fit_to_budget", "memory_sample_interval"})
_DATA_FILES = ("train.jsonl", "valid.jsonl")
_CHUNK = 1 << 20


class FileSum(BaseModel):
    model_config = ConfigDict(frozen=True)

    size: int
    sha256: str


class Manifest(BaseModel):
    """Written last: a checkpoint without a manifest that verifies does not exist."""

    model_config = ConfigDict(frozen=True)

    version: int = 1
    step: int
    config_hash: str
    data_hash: str
    files: dict[str, FileSum]


class VerifiedCheckpoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: Path
    manifest: Manifest

    @property
    def step(self) -> int:
        return self.manifest.step


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def write_checkpoint(
    root: Path, step: int, write_files: Callable[[Path], None], *, config_hash: str, data_hash: str
) -> Path:
    """Write checkpoint `step` under `root` crash-safely; returns its folder. Raises CheckpointWriteError naming the
    file and what failed (the staging folder is removed; earlier checkpoints stay as they were)."""
    final = root / f"{step:07d}"
    staging = root / f"{STAGING_PREFIX}{step:07d}-{os.getpid()}"
    doing = f"creating {staging}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        doing = f"writing the checkpoint files into {staging}"
        write_files(staging)
        files = {}
        for path in sorted(staging.iterdir()):
            doing = f"syncing {path}"
            _fsync(path)
            files[path.name] = _sum(path)
        manifest = Manifest(step=step, config_hash=config_hash, data_hash=data_hash, files=files)
        doing = f"writing {staging / MANIFEST}"
        _write_synced(staging / MANIFEST, manifest.model_dump_json(indent=2).encode())
        _fsync(staging)
        if final.exists():  # a stop right after a save asks for the same step again: keep the one in place
            shutil.rmtree(staging)
            return final
        doing = f"renaming {staging} to {final}"
        os.rename(staging, final)
        _fsync(root)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointWriteError(
            f"could not save checkpoint {step} ({doing}): {exc.strerror or exc}; the previous checkpoints are intact"
        ) from exc
    _prune(root, keep=KEEP)
    return final


def newest_verified(root: Path) -> VerifiedCheckpoint | None:
    for folder in sorted(root.glob("[0-9]" * 7), reverse=True):
        checkpoint = verify(folder)
        if checkpoint is not None:
            return checkpoint
        log.warning("checkpoint %s does not verify; skipping it", folder)
    return None


def verify(folder: Path) -> VerifiedCheckpoint | None:
    """The checkpoint if its manifest parses and every file it names has its size and SHA-256; else None."""
    try:
        manifest = Manifest.model_validate_json((folder / MANIFEST).read_bytes())
        for name, expected in manifest.files.items():
            path = folder / name
            if path.stat().st_size != expected.size or _sum(path).sha256 != expected.sha256:
                return None
    except (OSError, ValidationError, ValueError):
        return None
    return VerifiedCheckpoint(path=folder, manifest=manifest)


def clean_staging(root: Path) -> int:
    """Remove staging folders a crash left (a worker starting on the run is the only writer); returns how many."""
    leftovers = list(root.glob(STAGING_PREFIX + "*")) if root.is_dir() else []
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)
    return len(leftovers)


def config_hash(config: QLoRAConfig) -> str:
    """What the run computes: its config (less the watching settings) and the base model's fingerprint."""
    fields = config.model_dump(mode="json", exclude=set(_NOT_TRAINING))
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    model = Path(config.model)
    for path in _model_files(model):
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
        if path.name == "config.json":
            digest.update(path.read_bytes())
    return digest.hexdigest()


def data_hash(data_dir: Path) -> str:
    """The dataset's content: train.jsonl and valid.jsonl, byte for byte."""
    digest = hashlib.sha256()
    for name in _DATA_FILES:
        path = data_dir / name
        digest.update(f"{name}\n".encode())
        if path.is_file():
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
    return digest.hexdigest()


def _model_files(model: Path) -> Iterable[Path]:
    if model.is_file():
        return [model]
    if model.is_dir():
        return sorted(p for p in model.iterdir() if p.is_file() and p.suffix in {".json", ".safetensors", ".gguf"})
    return []  # a hub id not resolved here: the config's own text names it


def _sum(path: Path) -> FileSum:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return FileSum(size=path.stat().st_size, sha256=digest.hexdigest())


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: the names in it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    for folder in sorted(root.glob("[0-9]" * 7), reverse=True)[keep:]:
        shutil.rmtree(folder, ignore_errors=True)


def replace_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through a temporary file in its folder, fsynced and renamed over it: readers see the old file
    or the new one, never half of one."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # the suffix kept: MLX appends .safetensors otherwise
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(
            f"could not write {path}: {exc.strerror or exc}; the previous file is intact"
        ) from exc
