"""What models this machine holds for the server: the GGUF imports under the home and the Hugging Face hub cache,
each with its size on disk and where it came from (list_models; loaded models are the session's to add)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from .modelref import SOURCE_FILE

log = logging.getLogger(__name__)
GB = 1e9


class StoredModel(BaseModel):
    name: str = Field(description="What load_model and a run's `model` accept for it.")
    kind: Literal["imported", "hub_cache"]
    path: str
    size_gb: float = Field(description="Size on disk.")
    source: str | None = Field(None, description="The GGUF file it was imported from, or the hub repo id.")


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def imported_models(models_root: Path) -> list[StoredModel]:
    """GGUF imports (MLX model folders) under the server's models folder."""
    if not models_root.is_dir():
        return []
    found = []
    for folder in sorted(p for p in models_root.iterdir() if (p / "config.json").is_file()):
        source = None
        try:
            source = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8")).get("gguf")
        except (OSError, ValueError):
            pass  # imported before sources were recorded
        size = round(folder_size(folder) / GB, 3)
        found.append(
            StoredModel(name=source or str(folder), kind="imported", path=str(folder), size_gb=size, source=source)
        )
    return found


def hub_cached_models() -> list[StoredModel]:
    """Model repos in the Hugging Face hub cache (usable offline by repo id)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    except OSError as exc:  # unreadable cache: say so, list the rest
        log.warning("the Hugging Face cache could not be read: %s", exc)
        return []
    return [
        StoredModel(
            name=repo.repo_id, kind="hub_cache", path=str(repo.repo_path), size_gb=round(repo.size_on_disk / GB, 3),
            source=repo.repo_id,
        )
        for repo in sorted(cache.repos, key=lambda r: r.repo_id)
        if repo.repo_type == "model"
    ]  # fmt: skip
