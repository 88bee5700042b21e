"""GGUF -> MLX model folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json), no PyTorch.

`mlx.core.load` reads GGUF tensors; Q4_0, Q4_1 and Q8_0 arrive already in MLX's affine-quantized layout (weight,
scales, biases, with their group size), F32/F16/BF16 as floats. We map the tensor names of the `llama` and `qwen2`
architectures to MLX-LM's, rebuild the byte-level BPE tokenizer from the GGUF vocabulary and merges with the
`tokenizers` library, and keep the chat template and special tokens.

RoPE: llama.cpp's converter permutes Llama's Q/K rows for interleaved ("traditional") RoPE, so Llama GGUFs need
`rope_traditional: true`. It does not permute Qwen2 (llama.cpp runs Qwen2 with NEOX-style RoPE), so Qwen2 GGUFs
keep MLX-LM's default (`rope_traditional: false`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any, cast

from ..environment.isolated import child_main
from ..errors import ConfigError
from ..planning.modelref import GGUF_IMPORT_VERSION, gguf_cache_folder

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
#: GGUF file types (general.file_type) MLX loads without dequantizing, plus plain floats
SUPPORTED_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 32: "BF16"}
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
#: the pre-tokenizer split rules of the GGUF `tokenizer.ggml.pre` values we know
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    if key not in meta:
        if default is None:
            raise ConfigError(f"GGUF metadata has no {key!r}; the file is incomplete or not a supported model")
        return default
    value = meta[key]
    return value.item() if hasattr(value, "item") else value


def map_tensor_name(name: str) -> str:
    """`blk.3.attn_q.scales` -> `model.layers.3.self_attn.q_proj.scales`."""
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias|scales|biases)", name)
    if match:
        layer, part, leaf = match.groups()
        if part not in _BLOCK:
            raise ConfigError(f"GGUF tensor {name!r} has no MLX-LM counterpart (unsupported layer {part!r})")
        return f"model.layers.{layer}.{_BLOCK[part]}.{leaf}"
    top, _, leaf = name.partition(".")
    if top not in _TOP or leaf not in ("weight", "bias", "scales", "biases"):
        raise ConfigError(f"GGUF tensor {name!r} has no MLX-LM counterpart")
    return f"{_TOP[top]}.{leaf}"


def _model_config(meta: dict[str, Any], arch: str, tensors: dict[str, Any]) -> dict[str, Any]:
    hidden = int(_scalar(meta, f"{arch}.embedding_length"))
    heads = int(_scalar(meta, f"{arch}.attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(_scalar(meta, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_scalar(meta, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(meta, f"{arch}.attention.head_count_kv", heads)),
        "rms_norm_eps": float(_scalar(meta, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_scalar(meta, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_scalar(meta, f"{arch}.context_length", 4096)),
        "vocab_size": int(_scalar(meta, f"{arch}.vocab_size", len(tokens))),
        "tie_word_embeddings": "output.weight" not in tensors,
        "rope_traditional": arch == "llama",
    }
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        config["eos_token_id"] = int(_scalar(meta, "tokenizer.ggml.eos_token_id"))
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
    return config


def _quantization(tensors: dict[str, Any], mapped: dict[str, str], config: dict[str, Any]) -> dict[str, Any] | None:
    """Per-layer group size and bits, read off the packed shapes (GGUF files often mix Q8_0 and Q4_x)."""
    layers: dict[str, dict[str, int]] = {}
    for gguf_name, mlx_name in mapped.items():
        if not gguf_name.endswith(".scales"):
            continue
        path = mlx_name[: -len(".scales")]
        in_dims = config["intermediate_size"] if path.endswith("down_proj") else config["hidden_size"]
        packed, groups = tensors[gguf_name[: -len(".scales")] + ".weight"].shape[-1], tensors[gguf_name].shape[-1]
        bits, group_size = packed * 32 // in_dims, in_dims // groups
        if packed * 32 != bits * in_dims or group_size * groups != in_dims:
            raise ConfigError(f"cannot tell the quantization of GGUF tensor {gguf_name!r} from its shapes")
        layers[path] = {"group_size": group_size, "bits": bits}
    if not layers:
        return None
    values = list(layers.values())
    common = max(values, key=values.count)
    quant: dict[str, Any] = dict(common)
    quant.update({path: q for path, q in layers.items() if q != common})
    return quant


def _pre_tokenizer(kind: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind in ("gpt2", "default", ""):
        return byte_level
    if kind == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if kind == "qwen2":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ConfigError(f"GGUF tokenizer pre-tokenizer {kind!r} is not supported; supported: gpt2, smollm, qwen2")


def _write_tokenizer(meta: dict[str, Any], folder: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models

    if _scalar(meta, "tokenizer.ggml.model", "gpt2") != "gpt2":
        raise ConfigError(
            f"GGUF tokenizer model {meta['tokenizer.ggml.model']!r} is not supported; only byte-level BPE ('gpt2')"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types = meta.get("tokenizer.ggml.token_type")
    token_types = [int(t) for t in types.tolist()] if types is not None else [1] * len(tokens)
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(str(_scalar(meta, "tokenizer.ggml.pre", "default")))
    tokenizer.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types, strict=True) if kind == 3
    ]
    tokenizer.add_special_tokens(special)
    tokenizer.save(str(folder / "tokenizer.json"))

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index.item())] if index is not None else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"),
        "model_max_length": int(_scalar(meta, f"{meta['general.architecture']}.context_length", 4096)),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")


def import_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write an MLX model folder for `gguf_path` into `out_dir` (replaced if present) and return it."""
    import mlx.core as mx

    if not gguf_path.is_file():
        raise ConfigError(f"GGUF file {str(gguf_path)!r} does not exist")
    try:
        loaded = mx.load(str(gguf_path), return_metadata=True)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"{str(gguf_path)!r} is not a readable GGUF file: {exc}") from None
    tensors, meta = cast(tuple[dict[str, Any], dict[str, Any]], loaded)
    arch = str(meta.get("general.architecture", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    file_type = int(_scalar(meta, "general.file_type", 0))
    if file_type not in SUPPORTED_FILE_TYPES:
        raise ConfigError(
            f"GGUF quantization type {file_type} (general.file_type) is not supported; supported: "
            f"{', '.join(SUPPORTED_FILE_TYPES.values())} (re-quantize with llama.cpp to Q4_0, Q4_1 or Q8_0)"
        )
    mapped = {name: map_tensor_name(name) for name in tensors}
    config = _model_config(meta, arch, tensors)
    quant = _quantization(tensors, mapped, config)
    if quant:
        config["quantization"] = quant
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), {mapped[k]: v for k, v in tensors.items()})
    (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    _write_tokenizer(meta, tmp)
    (tmp / "gguf_source.json").write_text(
        json.dumps({"gguf": str(gguf_path), "import_version": GGUF_IMPORT_VERSION}), encoding="utf-8"
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # a folder appears complete or not at all
    log.info("imported %s (%s, %s) into %s", gguf_path.name, arch, SUPPORTED_FILE_TYPES[file_type], out_dir)
    return out_dir


def cached_import(gguf_path: Path, cache_root: Path) -> Path:
    """Import once per GGUF file (keyed by path, size and mtime) into `cache_root`, reusing earlier imports."""
    folder = gguf_cache_folder(gguf_path, cache_root)
    if (folder / "config.json").is_file():
        return folder
    return import_gguf(gguf_path, folder)


def _import_job(args: list[str]) -> None:
    import_gguf(Path(args[0]), Path(args[1]))


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.engine.gguf FILE OUT_DIR`: the isolated importer `resolve_model_dir` runs."""
    return child_main(_import_job, argv)


if __name__ == "__main__":
    sys.exit(main())
