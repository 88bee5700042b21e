"""GGUF import: the real SmolLM2 (llama, Q4_1 + Q8_0) and a qwen2 GGUF written here from the tiny model."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load

from mcp_local_demo.bundled import smollm2_gguf
from trainer import ConfigError
from trainer.engine.gguf import cached_import, import_gguf
from trainer.engine.inference import ModelSession
from trainer.planning.modelref import resolve_model_dir

pytestmark = pytest.mark.slow  # trains or builds kernels: seconds to minutes

QWEN2_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "input_layernorm": "attn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_attention_layernorm": "ffn_norm",
}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_gguf(smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "model")


def test_smollm2_imports_as_a_4bit_llama_with_traditional_rope(smollm2: Path) -> None:
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_traditional"] is True
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576 and config["tie_word_embeddings"]
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    tokenizer_config = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>" and "<|im_start|>" in tokenizer_config["chat_template"]


def test_smollm2_tokenizer_round_trips_code_and_keeps_special_tokens(smollm2: Path) -> None:
    _, tokenizer = load(str(smollm2))[:2]
    code = "def is_even(n: int) -> bool:\n    return n % 2 == 0  # 42\n"
    assert tokenizer.decode(tokenizer.encode(code)) == code
    assert len(tokenizer.encode("<|im_start|>")) == 1
    assert tokenizer.encode("12") == tokenizer.encode("1") + tokenizer.encode("2")  # smollm splits digits


def test_smollm2_writes_sensible_code_greedily(smollm2: Path) -> None:
    session = ModelSession()
    session.load(str(smollm2))
    reply = session.generate("Write a Python function is_even(n) that returns True when n is even.", max_tokens=60)
    code = reply.text.split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(code)
    assert any(isinstance(n, ast.FunctionDef) and n.name == "is_even" for n in ast.walk(tree)), reply.text


def _write_qwen2_gguf(tiny_model: Path, path: Path) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    weights = mx.load(str(tiny_model / "model.safetensors"))
    tensors = {}
    for name, value in weights.items():
        if name == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = value
        elif name == "model.norm.weight":
            tensors["output_norm.weight"] = value
        else:
            _, _, layer, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            tensors[f"blk.{layer}.{QWEN2_TO_GGUF[module]}.{leaf}"] = value
    tokenizer = json.loads((tiny_model / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tokenizer["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    tokens = [t for t, _ in vocab]
    meta = {
        "general.architecture": "qwen2",
        "general.file_type": mx.array(0, dtype=mx.uint32),
        "qwen2.embedding_length": mx.array(config["hidden_size"], dtype=mx.uint32),
        "qwen2.feed_forward_length": mx.array(config["intermediate_size"], dtype=mx.uint32),
        "qwen2.block_count": mx.array(config["num_hidden_layers"], dtype=mx.uint32),
        "qwen2.attention.head_count": mx.array(config["num_attention_heads"], dtype=mx.uint32),
        "qwen2.attention.head_count_kv": mx.array(config["num_key_value_heads"], dtype=mx.uint32),
        "qwen2.attention.layer_norm_rms_epsilon": mx.array(config["rms_norm_eps"], dtype=mx.float32),
        "qwen2.rope.freq_base": mx.array(config["rope_theta"], dtype=mx.float32),
        "qwen2.context_length": mx.array(1024, dtype=mx.uint32),
        "qwen2.vocab_size": mx.array(config["vocab_size"], dtype=mx.uint32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array([3 if t in special else 1 for t in tokens], dtype=mx.int32),
        "tokenizer.ggml.eos_token_id": mx.array(tokenizer["model"]["vocab"]["<|im_end|>"], dtype=mx.uint32),
        "tokenizer.chat_template": json.loads((tiny_model / "tokenizer_config.json").read_text())["chat_template"],
    }
    mx.save_gguf(str(path), tensors, meta)


def test_a_qwen2_gguf_imports_to_the_same_model(tiny_model: Path, tmp_path: Path) -> None:
    gguf = tmp_path / "tiny-qwen2.gguf"
    _write_qwen2_gguf(tiny_model, gguf)
    imported = import_gguf(gguf, tmp_path / "imported")
    config = json.loads((imported / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["rope_traditional"] is False and "quantization" not in config
    original, original_tok = load(str(tiny_model))[:2]
    model, tokenizer = load(str(imported))[:2]
    assert set(dict(tree_flatten(model.parameters()))) == set(dict(tree_flatten(original.parameters())))
    text = "def add_beta(x):\n    return x + 3\n"
    ids = tokenizer.encode(text)
    assert ids == original_tok.encode(text)
    tokens = mx.array([ids])
    assert mx.allclose(model(tokens), original(tokens), atol=1e-5).item()
    assert cached_import(gguf, tmp_path / "cache") == cached_import(gguf, tmp_path / "cache")  # imported once


def test_unsupported_gguf_architecture_and_type_are_named(tmp_path: Path) -> None:
    bad_arch = tmp_path / "phi.gguf"
    mx.save_gguf(str(bad_arch), {"x": mx.zeros((2,))}, {"general.architecture": "phi3"})
    with pytest.raises(ConfigError, match="GGUF architecture 'phi3' is not supported; supported: llama, qwen2"):
        import_gguf(bad_arch, tmp_path / "out")
    bad_type = tmp_path / "k.gguf"
    meta: dict[str, mx.array | str | list[str]] = {
        "general.architecture": "llama",
        "general.file_type": mx.array(15, dtype=mx.uint32),
    }
    mx.save_gguf(str(bad_type), {"x": mx.zeros((2,))}, meta)
    with pytest.raises(ConfigError, match="quantization type 15 .* is not supported"):
        import_gguf(bad_type, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_repo_ids_resolve_from_the_local_cache_offline(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "hub" / "models--acme--tiny-coder" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for file in tiny_model.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (tmp_path / "hub" / "models--acme--tiny-coder" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-coder" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_dir("acme/tiny-coder") == snapshot.resolve()
    with pytest.raises(ConfigError, match="'acme/missing' is not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        resolve_model_dir("acme/missing")
