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

from ..entrypoints import FUSE, GGUF_EXPORT
from ..environment.isolated import run_isolated
from ..errors import ConfigError
from ..lifecycle.jobs import Job
from ..lifecycle.store import RunStore
from ..planning.model_inventory import folder_size
from ..planning.modelref import resolve_adapter_dir, resolve_model_dir
from ..planning.paths import PathPolicy

GgufType = Literal["f16", "q8_0"]
#: what the export check decodes (a code prompt: this project's users tune coder models)
CHECK_PROMPT = "def fibonacci(n):"


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
        FUSE,
        args,
        what=f"fusing {adapter_dir} into {model_dir}",
        hint="check that the adapter was trained on this model (its adapter_config.json names it)",
    )
    return FusedModel(
        path=str(out_dir),
        base=str(model_dir),
        adapter=str(adapter_dir),
        dequantized=dequantize,
        size_gb=round(folder_size(out_dir) / 1e9, 3),
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
        GGUF_EXPORT,
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


def run_with_adapter(store: RunStore, run_id: str) -> tuple[Job, Path]:
    """A run that has written an adapter, and that adapter's folder (fuse, export and evaluate need one)."""
    job = store.get(run_id)
    if job.adapter_path is None or not (Path(job.adapter_path) / "adapters.safetensors").is_file():
        raise ConfigError(
            f"run {run_id} has no adapter yet (state {job.state.value}); a run writes its adapter as it trains: wait "
            "for its first checkpoint or its end"
        )
    return job, Path(job.adapter_path)


class ExportInputs(BaseModel):
    """What to export and where its files go by default: a run (its base and adapter; files in the run folder), a
    model and adapter (files next to the adapter), or a model alone (GGUF only; files under the home's exports/)."""

    model_config = ConfigDict(frozen=True)

    model_dir: Path
    adapter_dir: Path | None
    name: str
    out_dir: Path
    fused_name: str = "fused"

    def fused_dir(self) -> Path:
        return self.out_dir / self.fused_name

    def gguf_path(self, file_type: GgufType) -> Path:
        return self.out_dir / f"{self.name}-{file_type}.gguf"


def export_inputs(
    store: RunStore,
    *,
    run_id: str | None,
    model: str | None,
    adapter: str | None,
    models_root: Path | None = None,
    paths: PathPolicy | None = None,
) -> ExportInputs:
    if run_id is not None:
        job, adapter_dir = run_with_adapter(store, run_id)
        model_dir = resolve_model_dir(model or job.config.model, models_root, paths)
        return ExportInputs(model_dir=model_dir, adapter_dir=adapter_dir, name=run_id, out_dir=Path(job.run_dir))
    if model is None:
        raise ConfigError("name a run (run_id), or a model (with an adapter folder to fuse into it)")
    model_dir = resolve_model_dir(model, models_root, paths)
    if adapter is None:
        return ExportInputs(model_dir=model_dir, adapter_dir=None, name=model_dir.name, out_dir=store.root / "exports")
    adapter_dir = resolve_adapter_dir(str(paths.check(Path(adapter), "adapter") if paths else Path(adapter)))
    return ExportInputs(
        model_dir=model_dir,
        adapter_dir=adapter_dir,
        name=adapter_dir.name,
        out_dir=adapter_dir.parent,
        fused_name=f"{adapter_dir.name}-fused",
    )


class ExportedModel(BaseModel):
    model_config = ConfigDict(frozen=True)

    fused: FusedModel | None = Field(None, description="The fused MLX model folder (made or reused).")
    gguf: ExportedGguf | None = None

    def summary(self) -> str:
        parts = [f"fused model {self.fused.path} ({self.fused.size_gb:.2f} GB)"] if self.fused else []
        if self.gguf:
            check = self.gguf.check
            agreed = f", {check.equal_prefix} of {check.compared} greedy tokens as the source" if check else ""
            parts.append(f"GGUF {self.gguf.path} ({self.gguf.file_type}, {self.gguf.size_gb:.2f} GB{agreed})")
        return "; ".join(parts)


def _reusable(folder: Path, adapter_dir: Path, dequantize: bool) -> bool:
    made = folder / "fused_from.json"
    if not made.is_file():
        return False
    record = json.loads(made.read_text(encoding="utf-8"))
    return bool(record.get("adapter") == str(adapter_dir) and record.get("dequantized") == dequantize)


def export_model(
    inputs: ExportInputs, *, gguf_type: GgufType | None, keep_quantized: bool = False, out: Path | None = None
) -> ExportedModel:
    """Fuse the adapter (if any) into a model folder, then (with `gguf_type`) write it as GGUF. An earlier fuse of
    the same adapter is reused; `out` is the GGUF file, or the fused folder when no GGUF is asked for."""
    fused: FusedModel | None = None
    source = inputs.model_dir
    if inputs.adapter_dir is not None:
        folder = out if out is not None and gguf_type is None else inputs.fused_dir()
        dequantize = not keep_quantized or gguf_type is not None
        if _reusable(folder, inputs.adapter_dir, dequantize):
            fused = FusedModel(
                path=str(folder), base=str(inputs.model_dir), adapter=str(inputs.adapter_dir), dequantized=dequantize,
                size_gb=round(folder_size(folder) / 1e9, 3), seconds=0.0,
            )  # fmt: skip
        else:
            fused = fuse(inputs.model_dir, inputs.adapter_dir, folder, dequantize=dequantize)
        source = Path(fused.path)
    elif gguf_type is None:
        raise ConfigError("there is no adapter to fuse: name a run or an adapter, or ask for a GGUF file")
    gguf = None
    if gguf_type is not None:
        gguf = export_gguf(source, out if out is not None else inputs.gguf_path(gguf_type), gguf_type)
    return ExportedModel(fused=fused, gguf=gguf)
