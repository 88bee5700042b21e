"""The CPU decode kernel: built here for real, equal to MLX's quantized product, used by decode, and a clear fallback
where it cannot be built."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from trainer import decode_kernel
from trainer.bundled import smollm2_gguf
from trainer.errors import KernelBuildError
from trainer.fastpath import FastQuantizedEmbedding, FastQuantizedLinear
from trainer.inference import ModelSession


@pytest.fixture(scope="module")
def kernel() -> Any:
    decode_kernel.load.cache_clear()
    module = decode_kernel.load()
    assert module is not None, "the decode kernel did not build: see the warning above"
    return module


def _layer(n: int, k: int, group_size: int, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    w, scales, biases = mx.quantize(mx.random.normal((n, k)), group_size=group_size, bits=bits)
    return w, scales.astype(mx.float32), biases.astype(mx.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3])
def test_kernel_equals_mlx_quantized_matmul(kernel: Any, bits: int, group_size: int, rows: int) -> None:
    mx.random.seed(bits + group_size + rows)
    # 1536 outputs: enough work for the kernel to split them over threads
    w, scales, biases = _layer(1536, 512, group_size, bits)
    x = mx.random.normal((1, rows, 512))
    want = mx.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
    got = kernel.qgemv(x, w, scales, biases, group_size, bits)
    assert got.shape == want.shape == (1, rows, 1536)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-4).item()


def test_kernel_takes_strided_inputs_and_has_mlx_gradient(kernel: Any) -> None:
    mx.random.seed(1)
    w, scales, biases = _layer(256, 256, 32, 4)
    x = mx.random.normal((2, 512))[:, ::2]  # a view: the kernel makes it contiguous
    want = mx.quantized_matmul(x, w, scales, biases, group_size=32, bits=4)
    assert mx.allclose(kernel.qgemv(x, w, scales, biases, 32, 4), want, rtol=1e-5, atol=1e-4).item()
    grad = mx.grad(lambda v: kernel.qgemv(v, w, scales, biases, 32, 4).sum())(x)
    grad_want = mx.grad(lambda v: mx.quantized_matmul(v, w, scales, biases, group_size=32, bits=4).sum())(x)
    assert mx.allclose(grad, grad_want).item()


def test_kernel_names_what_it_cannot_compute(kernel: Any) -> None:
    w, scales, biases = _layer(64, 64, 32, 4)
    with pytest.raises(ValueError, match="4 or 8 bits only, got 2"):
        kernel.qgemv(mx.zeros((1, 64)), w, scales, biases, 32, 2)
    with pytest.raises(ValueError, match="float32"):
        kernel.qgemv(mx.zeros((1, 64), dtype=mx.float16), w, scales, biases, 32, 4)


def test_greedy_decode_through_the_kernel_equals_plain_mlx_lm(kernel: Any) -> None:
    """The real SmolLM2 (4-bit layers, 8-bit tied head): every quantized layer decodes through the kernel, and the
    greedy text is plain MLX-LM's."""
    prompt = "Write a Python function is_even(n) that returns True when n is even."
    texts = []
    for fast in (False, True):
        session = ModelSession(fast_path=fast)
        session.load(str(smollm2_gguf()))
        if fast:
            model = session._loaded[session.current].model  # type: ignore[index]
            fast_types = FastQuantizedLinear | FastQuantizedEmbedding
            layers = [m for _, m in model.named_modules() if isinstance(m, fast_types)]
            assert len(layers) == 30 * 7 + 1 and all(getattr(m, "_decode_kernel", None) is kernel for m in layers)
        texts.append(session.generate(prompt, max_tokens=24).text)
    assert texts[0] == texts[1]


def test_off_switch_keeps_mlx_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(decode_kernel.KERNEL_ENV, "off")
    decode_kernel.load.cache_clear()
    try:
        assert decode_kernel.load() is None
    finally:
        decode_kernel.load.cache_clear()


def test_a_failed_build_is_named_and_decode_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(decode_kernel.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(KernelBuildError, match="building the decode kernel failed"):
        decode_kernel.kernel_path()
    assert not list(tmp_path.glob("decode-kernel/*/_cpu_decode*")), "a failed build must leave no module behind"
    decode_kernel.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="trainer.decode_kernel"):
            assert decode_kernel.load() is None
        assert "CPU decode kernel unavailable" in caplog.text
    finally:
        decode_kernel.load.cache_clear()


def test_the_build_key_follows_the_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    before = decode_kernel.build_key()
    for name in decode_kernel.SOURCES:
        (tmp_path / name).write_bytes((decode_kernel.SOURCE_DIR / name).read_bytes() + b"\n")
    monkeypatch.setattr(decode_kernel, "SOURCE_DIR", tmp_path)
    assert decode_kernel.build_key() != before
