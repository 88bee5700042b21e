"""An adapter fused into its base model, written as an MLX model folder that `mlx_lm.generate` and `load_model` open.

The base is loaded as the run trained on it: quantized on the fly with the adapter's own settings when the base
folder is in floats and the run quantized it (`quantize_bits`), so the fused weights are the ones the adapter learned
against. MLX-LM's LoRA layers do the fusing (`LoRALinear.fuse`); kept quantized, the fused weights are quantized
again (a small rounding change), or dequantized to 16-bit floats for an exact merge.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, cast

from ..environment.isolated import child_main
from ..errors import ConfigError
from .mlx_import import require_mlx

log = logging.getLogger(__name__)


def load_with_adapter(model_dir: Path, adapter_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Base + adapter as training saw it (the base quantized like the run did when it is stored in floats)."""
    require_mlx()
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load, quantize_model

    adapter = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    model, tokenizer, config = cast(tuple[Any, Any, dict[str, Any]], load(str(model_dir), return_config=True))
    bits = adapter.get("quantize_bits")
    if bits and "quantization" not in config:
        model, config = quantize_model(model, config, adapter.get("group_size", 64), bits)
    load_adapters(model, str(adapter_dir))
    return model, tokenizer, config


def fuse_adapter(model_dir: Path, adapter_dir: Path, out_dir: Path, *, dequantize: bool) -> Path:
    """Write base + adapter as one model folder at `out_dir` (it appears complete or not at all)."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model, save

    if out_dir.exists():
        raise ConfigError(f"{out_dir} exists already; choose a new folder for the fused model (nothing is overwritten)")
    model, tokenizer, config = load_with_adapter(model_dir, adapter_dir)
    fused = [
        (name, module.fuse(dequantize=dequantize)) for name, module in model.named_modules() if hasattr(module, "fuse")
    ]
    if not fused:
        raise ConfigError(f"{adapter_dir} holds no LoRA layers to fuse")
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(partial, model_dir, model, tokenizer, config, donate_model=False)
    (partial / "fused_from.json").write_text(
        json.dumps({"model": str(model_dir), "adapter": str(adapter_dir), "dequantized": dequantize}), encoding="utf-8"
    )
    partial.rename(out_dir)
    log.info("fused %s into %s: %s", adapter_dir, model_dir, out_dir)
    return out_dir


def _fuse_job(args: list[str]) -> None:
    fuse_adapter(Path(args[0]), Path(args[1]), Path(args[2]), dequantize="--dequantize" in args[3:])


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.engine.fuse MODEL_DIR ADAPTER_DIR OUT_DIR [--dequantize]` (results/ runs it isolated)."""
    return child_main(_fuse_job, argv)


if __name__ == "__main__":
    sys.exit(main())
