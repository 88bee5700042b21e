"""From a run to a result: an adapter fused into its base (exact in 16-bit floats), and the model written as GGUF
that our importer (and llama.cpp, when installed) loads back to the same greedy tokens."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mcp_local_demo.bundled import smollm2_gguf
from trainer import ConfigError
from trainer.engine.gguf import import_gguf
from trainer.results.exports import CHECK_PROMPT, ExportedGguf, export_gguf, fuse

pytestmark = pytest.mark.slow  # real MLX: fuse and GGUF export

PROMPT = [1, 5, 9, 20, 33, 7, 100, 3]


def random_adapter(model_dir: Path, out: Path, *, bits: int | None = None, layers: int = 2) -> Path:
    """A LoRA adapter in MLX-LM's format with random (non-zero) B matrices, as if trained: the fuse must carry it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load, quantize_model

    model, _, config = load(str(model_dir), return_config=True)  # type: ignore[misc]
    if bits and "quantization" not in config:
        model, config = quantize_model(model, config, 32, bits)
    model.freeze()
    lora = {"rank": 4, "scale": 2.0, "dropout": 0.0}
    linear_to_lora_layers(model, layers, lora)
    mx.random.seed(0)
    parameters: list[tuple[str, mx.array]] = tree_flatten(model.trainable_parameters())  # type: ignore[assignment]
    trained = {
        name: mx.random.normal(value.shape) * 0.2 if name.endswith("lora_b") else value for name, value in parameters
    }
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), trained)
    adapter_config = {"fine_tune_type": "lora", "num_layers": layers, "lora_parameters": lora}
    (out / "adapter_config.json").write_text(json.dumps(adapter_config | {"quantize_bits": bits, "group_size": 32}))
    return out


def max_difference(a, b) -> float:  # type: ignore[no-untyped-def]
    import mlx.core as mx

    return float(mx.abs(a - b).max().item())  # type: ignore[arg-type]


def logits(model_dir: Path, adapter: Path | None = None):  # type: ignore[no-untyped-def]
    import mlx.core as mx
    from mlx_lm.utils import load

    from trainer.engine.fuse import load_with_adapter

    model = load_with_adapter(model_dir, adapter)[0] if adapter else load(str(model_dir))[0]  # type: ignore[index]
    return model(mx.array([PROMPT])).astype(mx.float32)


@pytest.mark.parametrize("bits", [None, 4], ids=["float-base", "quantized-by-the-run"])
def test_a_fused_model_equals_base_plus_adapter(tmp_path: Path, tiny_model: Path, bits: int | None) -> None:

    from trainer.engine.gguf_export import greedy_tokens

    adapter = random_adapter(tiny_model, tmp_path / "adapter", bits=bits)
    fused = fuse(tiny_model, adapter, tmp_path / "fused")
    assert fused.dequantized and Path(fused.path, "config.json").is_file() and fused.size_gb > 0
    assert "quantization" not in json.loads(Path(fused.path, "config.json").read_text())
    assert max_difference(logits(Path(fused.path)), logits(tiny_model, adapter)) < 1e-3
    assert max_difference(logits(tiny_model), logits(tiny_model, adapter)) > 1e-2  # the adapter does matter

    from mlx_lm import generate
    from mlx_lm.utils import load

    from trainer.engine.fuse import load_with_adapter

    model, tokenizer, _ = load_with_adapter(tiny_model, adapter)
    expected = generate(model, tokenizer, "def add(a, b):", max_tokens=24)
    fused_model, fused_tokenizer = load(fused.path)[:2]  # type: ignore[misc]
    assert generate(fused_model, fused_tokenizer, "def add(a, b):", max_tokens=24) == expected
    assert len(greedy_tokens(Path(fused.path), "x", 4)) == 4


def test_a_fused_model_can_stay_quantized_and_nothing_is_overwritten(tmp_path: Path, tiny_model: Path) -> None:
    adapter = random_adapter(tiny_model, tmp_path / "adapter", bits=4)
    kept = fuse(tiny_model, adapter, tmp_path / "fused-q4", dequantize=False)
    assert json.loads(Path(kept.path, "config.json").read_text())["quantization"]["bits"] == 4
    with pytest.raises(ConfigError, match="exists already; choose a new folder"):
        fuse(tiny_model, adapter, tmp_path / "fused-q4")
    with pytest.raises(ConfigError, match="holds no LoRA layers|adapter"):
        broken = tmp_path / "broken"
        shutil.copytree(adapter, broken)
        (broken / "adapters.safetensors").write_bytes(b"not weights")
        fuse(tiny_model, broken, tmp_path / "never")
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.partial").exists()


@pytest.mark.parametrize("file_type", ["f16", "q8_0"])
def test_an_exported_gguf_loads_back_to_the_same_greedy_tokens(
    tmp_path: Path, tiny_model: Path, file_type: str
) -> None:
    adapter = random_adapter(tiny_model, tmp_path / "adapter")
    fused = fuse(tiny_model, adapter, tmp_path / "fused")
    exported = export_gguf(Path(fused.path), tmp_path / f"model-{file_type}.gguf", file_type)  # type: ignore[arg-type]
    assert exported.check is not None and exported.check.prompt == CHECK_PROMPT
    assert exported.check.compared == 32 and exported.check.equal_prefix == 32
    with pytest.raises(ConfigError, match="exists already"):
        export_gguf(Path(fused.path), Path(exported.path))
    with pytest.raises(ConfigError, match="must end in .gguf"):
        export_gguf(Path(fused.path), tmp_path / "model.bin")


def test_a_llama_in_hugging_face_layout_is_permuted_for_gguf(tmp_path: Path, tiny_model: Path) -> None:
    """Hugging Face llama checkpoints keep rotary halves apart; GGUF interleaves them (llama.cpp's converter
    permutes q/k). Exported and imported back (traditional rotary), the logits are the same."""
    import mlx.core as mx

    llama = tmp_path / "llama"
    shutil.copytree(tiny_model, llama)
    config = json.loads((llama / "config.json").read_text())
    config.update(model_type="llama", attention_bias=False, mlp_bias=False)
    (llama / "config.json").write_text(json.dumps(config))
    for weights_file in llama.glob("*.safetensors"):
        weights = mx.load(str(weights_file))
        mx.save_safetensors(str(weights_file), {k: v for k, v in weights.items() if not k.endswith(".bias")})  # type: ignore[union-attr]
    exported = export_gguf(llama, tmp_path / "llama.gguf", "f16", check=False)
    back = import_gguf(Path(exported.path), tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["rope_traditional"] is True
    assert max_difference(logits(llama), logits(back)) < 5e-3  # float16 rounding only


@pytest.fixture(scope="module")
def smollm2_exported(tmp_path_factory: pytest.TempPathFactory) -> ExportedGguf:
    """The bundled real model with an adapter fused in, written as a 16-bit GGUF (checked on the way)."""
    folder = tmp_path_factory.mktemp("smollm2-export")
    base = import_gguf(smollm2_gguf(), folder / "smollm2")
    fused = fuse(base, random_adapter(base, folder / "adapter", layers=4), folder / "fused")
    return export_gguf(Path(fused.path), folder / "smollm2-tuned-f16.gguf")


@pytest.mark.slow
def test_smollm2_fused_and_exported_decodes_the_same_32_tokens(smollm2_exported: ExportedGguf) -> None:
    check = smollm2_exported.check
    assert check is not None and check.equal_prefix == check.compared == 32
    assert 0.2 < smollm2_exported.size_gb < 0.4  # 135M parameters in 16-bit floats


@pytest.mark.slow
def test_llama_cpp_loads_the_export_when_installed(smollm2_exported: ExportedGguf) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (an optional check)")
    model = llama_cpp.Llama(model_path=smollm2_exported.path, verbose=False)
    assert model.tokenize(b"def add(a, b):")


def test_the_cli_fuses_and_exports(tmp_path: Path, tiny_model: Path) -> None:
    adapter = random_adapter(tiny_model, tmp_path / "adapter")
    home = ["--home", str(tmp_path / "home")]
    fuse_cmd = [*home, "fuse", "--model", str(tiny_model), "--adapter", str(adapter), "--out", str(tmp_path / "f")]
    done = subprocess.run([sys.executable, "-m", "trainer", *fuse_cmd], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["path"] == str(tmp_path / "f")
    export = [*home, "export-gguf", str(tmp_path / "f"), str(tmp_path / "f.gguf"), "--type", "q8_0"]
    done = subprocess.run([sys.executable, "-m", "trainer", *export], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["check"]["compared"] == 32
    refused = subprocess.run([sys.executable, "-m", "trainer", *home, "fuse"], capture_output=True, text=True)
    assert refused.returncode == 2 and "name a run (run_id), or a model" in refused.stderr
