"""The CPU decode kernels: built here for real, equal to MLX's operations (values and gradients), used by decode, and a
clear fallback where they cannot be built."""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from mcp_local_demo.bundled import smollm2_gguf
from trainer.engine import decode_kernel
from trainer.engine.decode_choice import IGNORE_ENV
from trainer.engine.decode_layers import DecodeRMSNorm, DecodeRoPE
from trainer.engine.fastpath import FastQuantizedEmbedding, FastQuantizedLinear
from trainer.engine.inference import ModelSession
from trainer.errors import KernelBuildError

pytestmark = pytest.mark.slow  # trains or builds kernels: seconds to minutes


@pytest.fixture(scope="module")
def kernel() -> Iterator[Any]:
    """The kernel, loaded whatever this machine's speed choice says: these tests check what it computes."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(IGNORE_ENV, "ignore")
        decode_kernel._load_once.cache_clear()
        module = decode_kernel.load()
        assert module is not None, "the decode kernel did not build: see the warning above"
        yield module
    decode_kernel._load_once.cache_clear()


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


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 code paths")
@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_the_avx2_and_portable_paths_equal_mlx_too(march: str, tmp_path: Path) -> None:
    """This machine builds the AVX-512 path; other CPUs get AVX2 (haswell) or portable code (x86-64)."""
    other = decode_kernel.import_kernel(decode_kernel.build(tmp_path, march=march))
    mx.random.seed(4)
    for bits in (4, 8):
        w, scales, biases = _layer(1536, 512, 64, bits)
        x = mx.random.normal((1, 2, 512))
        want = mx.quantized_matmul(x, w, scales, biases, group_size=64, bits=bits)
        assert mx.allclose(other.qgemv(x, w, scales, biases, 64, bits), want, rtol=1e-5, atol=1e-4).item(), bits


def test_kernel_takes_strided_inputs_and_has_mlx_gradient(kernel: Any) -> None:
    mx.random.seed(1)
    w, scales, biases = _layer(256, 256, 32, 4)
    x = mx.random.normal((2, 512))[:, ::2]  # a view: the kernel makes it contiguous
    want = mx.quantized_matmul(x, w, scales, biases, group_size=32, bits=4)
    assert mx.allclose(kernel.qgemv(x, w, scales, biases, 32, 4), want, rtol=1e-5, atol=1e-4).item()
    grad = mx.grad(lambda v: kernel.qgemv(v, w, scales, biases, 32, 4).sum())(x)
    grad_want = mx.grad(lambda v: mx.quantized_matmul(v, w, scales, biases, group_size=32, bits=4).sum())(x)
    assert mx.allclose(grad, grad_want).item()


def test_rms_norm_and_rope_equal_mlx_with_its_gradients(kernel: Any) -> None:
    mx.random.seed(2)
    x, weight = mx.random.normal((2, 3, 96)), mx.random.normal((96,))
    assert mx.allclose(kernel.rms_norm(x, weight, 1e-5), mx.fast.rms_norm(x, weight, 1e-5), atol=1e-5).item()
    grads = [
        mx.grad(lambda v, f=f: (f(v) ** 2).sum())(x)
        for f in (lambda v: kernel.rms_norm(v, weight, 1e-5), lambda v: mx.fast.rms_norm(v, weight, 1e-5))
    ]
    assert mx.allclose(grads[0], grads[1], atol=1e-4).item()
    q = mx.random.normal((1, 4, 2, 64))
    for traditional in (False, True):
        for offset in (0, 5, 700):
            got = kernel.rope(q, 48, traditional, 10000.0, 1.0, offset)  # the last 16 of 64 dims pass through
            want = mx.fast.rope(q, 48, traditional=traditional, base=10000.0, scale=1.0, offset=offset)
            assert mx.allclose(got, want, atol=5e-5).item(), (traditional, offset)


def test_attention_reads_cache_views_and_equals_mlx(kernel: Any) -> None:
    mx.random.seed(3)
    q = mx.random.normal((2, 8, 1, 32))
    # a KV cache hands over views: the first 37 of 64 slots
    k, v = mx.random.normal((2, 2, 64, 32))[:, :, :37], mx.random.normal((2, 2, 64, 32))[:, :, :37]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.17)
    assert mx.allclose(kernel.attention(q, k, v, 0.17), want, atol=1e-5).item()
    grad = mx.grad(lambda t: kernel.attention(t, k, v, 0.17).sum())(q)
    grad_want = mx.grad(lambda t: mx.fast.scaled_dot_product_attention(t, k, v, scale=0.17).sum())(q)
    assert mx.allclose(grad, grad_want, atol=1e-5).item()


def test_kernel_names_what_it_cannot_compute(kernel: Any) -> None:
    w, scales, biases = _layer(64, 64, 32, 4)
    with pytest.raises(ValueError, match="4 or 8 bits only, got 2"):
        kernel.qgemv(mx.zeros((1, 64)), w, scales, biases, 32, 2)
    with pytest.raises(ValueError, match="float32"):
        kernel.qgemv(mx.zeros((1, 64), dtype=mx.float16), w, scales, biases, 32, 4)
    with pytest.raises(ValueError, match="rope.*float32"):
        kernel.rope(mx.zeros((1, 1, 1, 64), dtype=mx.bfloat16), 64, False, 10000.0, 1.0, 0)
    with pytest.raises(ValueError, match="q \\(B, Hq, L, D\\)"):
        kernel.attention(mx.zeros((1, 3, 1, 8)), mx.zeros((1, 2, 4, 8)), mx.zeros((1, 2, 4, 8)), 1.0)


def test_greedy_decode_through_the_kernel_equals_plain_mlx_lm(kernel: Any) -> None:
    """The real SmolLM2 (4-bit layers, 8-bit tied head, traditional RoPE, grouped-query attention): every quantized
    layer, RMS norm and RoPE decodes through the kernels, and the greedy text is plain MLX-LM's."""
    prompt = "Write a Python function is_even(n) that returns True when n is even."
    texts = []
    for fast in (False, True):
        session = ModelSession(fast_path=fast)
        info = session.load(str(smollm2_gguf()))
        assert info.decode_kernel_layers == (30 * 7 + 1 + 30 * 3 + 1 if fast else 0)
        if fast:
            model = session._loaded[session.current].model  # type: ignore[index]
            fast_types = FastQuantizedLinear | FastQuantizedEmbedding
            layers = [m for _, m in model.named_modules() if isinstance(m, fast_types)]
            assert len(layers) == 30 * 7 + 1 and all(getattr(m, "_decode_kernel", None) is kernel for m in layers)
            norms = [m for _, m in model.named_modules() if isinstance(m, DecodeRMSNorm | DecodeRoPE)]
            assert len(norms) == 30 * 3 + 1 and all(m._decode_kernel is kernel for m in norms)
        texts.append(session.generate(prompt, max_tokens=24).text)
    assert texts[0] == texts[1]


def test_off_switch_keeps_mlx_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(decode_kernel.KERNEL_ENV, "off")
    decode_kernel._load_once.cache_clear()
    try:
        assert decode_kernel.load() is None
    finally:
        decode_kernel._load_once.cache_clear()


def test_a_failed_build_is_named_and_decode_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(decode_kernel.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(KernelBuildError, match="building the decode kernel failed"):
        decode_kernel.kernel_path()
    assert not list(tmp_path.glob("decode-kernel/*/_cpu_decode*")), "a failed build must leave no module behind"
    decode_kernel._load_once.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="trainer.engine.decode_kernel"):
            assert decode_kernel.load() is None
        assert "CPU decode kernels unavailable" in caplog.text
    finally:
        decode_kernel._load_once.cache_clear()


def test_the_build_key_follows_the_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    before = decode_kernel.build_key()
    for name in decode_kernel.SOURCES:
        (tmp_path / name).write_bytes((decode_kernel.SOURCE_DIR / name).read_bytes() + b"\n")
    monkeypatch.setattr(decode_kernel, "SOURCE_DIR", tmp_path)
    assert decode_kernel.build_key() != before


def test_the_kernels_are_used_only_where_they_measured_faster_than_mlx(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Measured once per machine by the build command (the set-up scripts run it): our kernels against MLX's own
    operations, decoding a random model of SmolLM2's shape. This machine's numbers are in the log."""
    from trainer.engine.decode_choice import DecodeChoice, measure, recorded

    monkeypatch.delenv(IGNORE_ENV, raising=False)  # the choice as the product reads it, not the kernel fixture's
    kernel_dir = decode_kernel.kernel_path().parent
    choice = recorded(kernel_dir) or measure(kernel_dir)
    logging.getLogger(__name__).warning(
        "decode here: kernels %s, MLX %s tokens/s", choice.kernel_tok_s, choice.mlx_tok_s
    )
    decode_kernel._load_once.cache_clear()
    try:
        assert (decode_kernel.load() is not None) == choice.use_kernel
        slower = DecodeChoice(kernel_tok_s=5.0, mlx_tok_s=10.0)  # a CPU where the kernels lose
        monkeypatch.setattr(decode_kernel, "recorded", lambda _dir: slower)
        decode_kernel._load_once.cache_clear()
        with caplog.at_level(logging.WARNING, logger="trainer.engine.decode_kernel"):
            assert decode_kernel.load() is None
        assert "measured slower than MLX's own operations" in caplog.text and "5.0 against 10.0" in caplog.text
    finally:
        decode_kernel._load_once.cache_clear()


def test_a_kernel_being_built_is_said_once_however_many_loads_ask(caplog: pytest.LogCaptureFixture) -> None:
    from trainer.engine import decode_kernel

    was_building, was_said = decode_kernel._building.is_set(), decode_kernel._said_building.is_set()
    decode_kernel._building.set()
    decode_kernel._said_building.clear()
    try:
        with caplog.at_level(logging.INFO, logger=decode_kernel.__name__):
            assert [decode_kernel.load() for _ in range(5)] == [None] * 5
    finally:
        if not was_building:
            decode_kernel._building.clear()
        if was_said:
            decode_kernel._said_building.set()
    assert sum("being built" in r.getMessage() for r in caplog.records) == 1
