"""Fuse a run's adapter into its base, and write a model as GGUF, each in a child process (environment/isolated.py).

Outputs are never overwritten: a fused folder or a GGUF file appears complete or not at all. The GGUF export checks
itself: the file is loaded back through our importer and greedy-decodes a prompt next to the source model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from ..isolated import run_isolated
from ..lifecycle.store import RunStore
from ..planning.modelref import resolve_adapter_dir, resolve_model_dir
from ..planning.paths import PathPolicy

GgufType = Literal["f16", "q8_0"]
#: what the export check decodes (a code prompt: this project's users tune coder models)
CHECK_PROMPT = "def fibonacci(n):"


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class FusedModel(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str = Field(description="The fused model folder (load_model, mlx_lm.generate and export_gguf open it).")
    base: str
    adapter: str
    dequantized: bool
    size_gb: float
    seconds: float


class GgufCheck(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt: str
    compared: int = Field(description="Greedy tokens decoded from both the source folder and the GGUF file.")
    equal_prefix: int = Field(description="How many of them agree before the first difference.")


class ExportedGguf(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    source: str
    file_type: GgufType
    size_gb: float
    seconds: float
    check: GgufCheck | None = None


def fuse(model_dir: Path, adapter_dir: Path, out_dir: Path, *, dequantize: bool = True) -> FusedModel:
    """`model_dir` + `adapter_dir` as one model folder at `out_dir` (16-bit floats unless `dequantize` is False)."""
    if out_dir.exists():
        raise ConfigError(f"{out_dir} exists already; choose a new folder for the fused model (nothing is overwritten)")
    start = time.perf_counter()
    args = [str(model_dir), str(adapter_dir), str(out_dir)] + (["--dequantize"] if dequantize else [])
    run_isolated(
        "trainer.engine.fuse",
        args,
        what=f"fusing {adapter_dir} into {model_dir}",
        hint="check that the adapter was trained on this model (its adapter_config.json names it)",
    )
    return FusedModel(
        path=str(out_dir),
        base=str(model_dir),
        adapter=str(adapter_dir),
        dequantized=dequantize,
        size_gb=round(folder_bytes(out_dir) / 1e9, 3),
        seconds=round(time.perf_counter() - start, 1),
    )


def export_gguf(model_dir: Path, out_path: Path, file_type: GgufType = "f16", *, check: bool = True) -> ExportedGguf:
    """Write `model_dir` as the GGUF file `out_path`; with `check`, load it back and compare greedy tokens."""
    if out_path.exists():
        raise ConfigError(f"{out_path} exists already; choose a new file name (nothing is overwritten)")
    if out_path.suffix != ".gguf":
        raise ConfigError(f"GGUF file name {str(out_path)!r} must end in .gguf")
    start = time.perf_counter()
    out = run_isolated(
        "trainer.engine.gguf_export",
        [str(model_dir), str(out_path), file_type] + ([CHECK_PROMPT] if check else []),
        what=f"exporting {model_dir} as GGUF",
        hint="only llama and qwen2 models with byte-level BPE tokenizers are exported",
    )
    result = GgufCheck(prompt=CHECK_PROMPT, **json.loads(out.strip().splitlines()[-1])) if check else None
    return ExportedGguf(
        path=str(out_path),
        source=str(model_dir),
        file_type=file_type,
        size_gb=round(out_path.stat().st_size / 1e9, 3),
        seconds=round(time.perf_counter() - start, 1),
        check=result,
    )


class FuseInputs(BaseModel):
    """What to fuse and where it goes by default: from a run (its base and adapter) or named directly."""

    model_config = ConfigDict(frozen=True)

    model_dir: Path
    adapter_dir: Path
    default_out: Path


def fuse_inputs(
    store: RunStore,
    *,
    run_id: str | None,
    model: str | None,
    adapter: str | None,
    models_root: Path | None = None,
    paths: PathPolicy | None = None,
) -> FuseInputs:
    """A run's base and adapter (default output: the run folder's `fused/`), or a model and adapter named directly
    (default output: next to the adapter)."""
    if run_id is not None:
        job = store.get(run_id)
        if job.adapter_path is None or not (Path(job.adapter_path) / "adapters.safetensors").is_file():
            raise ConfigError(
                f"run {run_id} has no adapter to fuse (state {job.state.value}); a run writes its adapter as it "
                "trains: wait for its first checkpoint or its end"
            )
        model = model or job.config.model
        adapter_dir = Path(job.adapter_path)
        default_out = Path(job.run_dir) / "fused"
    elif model is None or adapter is None:
        raise ConfigError("name a run (run_id), or both a model and an adapter folder to fuse")
    else:
        adapter_dir = resolve_adapter_dir(str(paths.check(Path(adapter), "adapter") if paths else Path(adapter)))
        default_out = adapter_dir.parent / f"{adapter_dir.name}-fused"
    return FuseInputs(
        model_dir=resolve_model_dir(model, models_root, paths), adapter_dir=adapter_dir, default_out=default_out
    )
