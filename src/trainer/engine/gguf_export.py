"""An MLX model folder (a fused model, typically) written as a GGUF file that llama.cpp, Ollama and LM Studio load.

llama and qwen2 models with byte-level BPE tokenizers; 16-bit floats (`f16`) or llama.cpp's 8-bit blocks (`q8_0`),
written and quantized by the `gguf` package (llama.cpp's own Python writer). Tensor names are the importer's map
(gguf.py) read backwards, so what we export our importer reads. A llama model in Hugging Face's rotary layout has its
q/k rows permuted into GGUF's (as llama.cpp's converter does); one imported from GGUF (`rope_traditional`) is in it
already. The check loads the file back through our importer and compares greedy tokens with the source folder.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Literal, cast

from ..environment.isolated import child_main
from ..errors import ConfigError
from .gguf import _BLOCK, _QWEN2_SPLIT, _TOP, SUPPORTED_ARCHITECTURES
from .mlx_import import require_mlx

log = logging.getLogger(__name__)
GgufType = Literal["f16", "q8_0"]
#: greedy tokens the export check compares
CHECK_TOKENS = 32
_MLX_TO_GGUF = {mlx: gguf for gguf, mlx in _BLOCK.items()}


def gguf_tensor_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (the importer's map, backwards)."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if match and match[2] in _MLX_TO_GGUF:
        return f"blk.{match[1]}.{_MLX_TO_GGUF[match[2]]}.{match[3]}"
    top, _, leaf = name.rpartition(".")
    for gguf_top, mlx_top in _TOP.items():
        if top == mlx_top:
            return f"{gguf_top}.{leaf}"
    raise ConfigError(f"tensor {name!r} has no GGUF name (only llama/qwen2 decoder layers are exported)")


def _pre_tokenizer_kind(tokenizer: dict[str, Any]) -> str:
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = {part.get("type") for part in parts}
    if any(part.get("type") == "Digits" and part.get("individual_digits") for part in parts):
        return "smollm"
    splits = [part for part in parts if part.get("type") == "Split"]
    if splits and all((part.get("pattern") or {}).get("Regex") == _QWEN2_SPLIT for part in splits):
        return "qwen2"
    if kinds == {"ByteLevel"}:
        return "gpt2"
    raise ConfigError(
        f"tokenizer pre-tokenizer {pre.get('type')!r} ({sorted(map(str, kinds))}) has no GGUF equivalent here"
    )


def _special(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _add_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> None:
    import gguf

    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConfigError(f"{model_dir}/tokenizer.json is not a byte-level BPE tokenizer; only those are exported")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    vocab.update({t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])})
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens, types = [f"[PAD{i}]" for i in range(size)], [gguf.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = gguf.TokenType.CONTROL if text in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_kind(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    adders = {"bos_token": writer.add_bos_token_id, "eos_token": writer.add_eos_token_id}
    for key, add in (adders | {"pad_token": writer.add_pad_token_id}).items():
        special_text = _special(config.get(key))
        if special_text is not None and special_text in vocab:
            add(vocab[special_text])
    writer.add_add_bos_token(bool(config.get("add_bos_token", False)))
    if isinstance(config.get("chat_template"), str):
        writer.add_chat_template(config["chat_template"])


def _permute_rows(weights: Any, heads: int) -> Any:
    """Hugging Face's rotary layout -> GGUF's interleaved one, for llama q/k (llama.cpp's converter does the same)."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _add_model(writer: Any, config: dict[str, Any], arch: str, file_type: GgufType, name: str) -> None:
    import gguf

    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads", heads)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(int(config.get("head_dim", hidden // heads)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if file_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)


def _add_tensors(writer: Any, weights: dict[str, Any], config: dict[str, Any], arch: str, file_type: GgufType) -> None:
    import gguf
    import mlx.core as mx
    import numpy as np

    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads", heads))
    permute = arch == "llama" and not config.get("rope_traditional", False)
    for mlx_name, value in sorted(weights.items()):
        array = np.array(value.astype(mx.float32))
        if permute and mlx_name.endswith(("q_proj.weight", "k_proj.weight")):
            array = _permute_rows(array, heads if "q_proj" in mlx_name else kv_heads)
        name = gguf_tensor_name(mlx_name)
        if array.ndim == 1:
            writer.add_tensor(name, array)  # norms and biases stay 32-bit, as llama.cpp writes them
        elif file_type == "q8_0" and array.shape[-1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, array.astype(np.float16))


def export_gguf(model_dir: Path, out_path: Path, file_type: GgufType = "f16") -> Path:
    """Write `model_dir` as the GGUF file `out_path` (it appears complete or not at all)."""
    require_mlx()
    import gguf
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model, load

    if out_path.exists():
        raise ConfigError(f"{out_path} exists already; choose a new file name (nothing is overwritten)")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = str(config.get("model_type"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"model type {arch!r} cannot be exported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    model, _ = cast(tuple[Any, Any], load(str(model_dir)))
    if "quantization" in config:
        model = dequantize_model(model)  # GGUF gets its own blocks (or 16-bit floats)
    weights = dict(tree_flatten(model.parameters()))
    partial = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    _add_model(writer, config, arch, file_type, model_dir.name)
    _add_tokenizer(writer, model_dir, int(config.get("vocab_size", 0)))
    _add_tensors(writer, weights, config, arch, file_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(out_path)
    log.info("exported %s as %s (%s)", model_dir, out_path, file_type)
    return out_path


def greedy_tokens(model_dir: Path, prompt: str, count: int) -> list[int]:
    """The first `count` greedy tokens of MLX-LM's own generation (no fast path): the reference both sides share."""
    from mlx_lm import stream_generate
    from mlx_lm.utils import load

    model, tokenizer = cast(tuple[Any, Any], load(str(model_dir)))
    return [out.token for out in stream_generate(model, tokenizer, prompt, max_tokens=count)][:count]


def check_gguf(gguf_path: Path, model_dir: Path, prompt: str, count: int) -> dict[str, int]:
    """Load the file back through our importer and count the greedy tokens it shares with `model_dir`."""
    import tempfile

    from .gguf import import_gguf

    with tempfile.TemporaryDirectory(dir=gguf_path.parent) as scratch:
        back = import_gguf(gguf_path, Path(scratch) / "imported")
        expected, got = greedy_tokens(model_dir, prompt, count), greedy_tokens(back, prompt, count)
    equal = next(
        (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), min(len(expected), len(got))
    )
    return {"compared": len(expected), "equal_prefix": equal}


def _export_job(args: list[str]) -> None:
    out = export_gguf(Path(args[0]), Path(args[1]), cast(GgufType, args[2]))
    if len(args) > 3:
        sys.stdout.write(json.dumps(check_gguf(out, Path(args[0]), args[3], CHECK_TOKENS)) + "\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.engine.gguf_export MODEL_DIR OUT.gguf f16|q8_0 [CHECK_PROMPT]` (results/ runs it isolated);
    with a prompt, prints the check's JSON on stdout."""
    return child_main(_export_job, argv)


if __name__ == "__main__":
    sys.exit(main())
