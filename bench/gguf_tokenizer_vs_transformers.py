"""Our GGUF tokenizer rebuild (trainer.engine.gguf) against transformers' GGUF tokenizer converter, on the bundled
SmolLM2 GGUF: token ids of every paragraph of this repository's sources and docs, plus a few edge cases. The issue
asked to switch to the kept library if it encodes identically; where it does not, this prints the first differences.

uv run python bench/gguf_tokenizer_vs_transformers.py   (docs/benchmarks.md, "GGUF tokenizer")
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
from tokenizers import Tokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

from mcp_local_demo.bundled import smollm2_gguf
from trainer.engine.gguf import _write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EDGE_CASES = ["héllo wörld 🎉 日本語 1234567", "<|im_start|>user\nhi<|im_end|>", "  two\t\ttabs", "x" * 50, "\n    512"]


def transformers_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """transformers' converter, fed the same metadata (its own GGUF reader needs PyTorch)."""
    plain = {k: v.tolist() if isinstance(v, mx.array) else v for k, v in meta.items() if k.startswith("tokenizer.")}
    fields = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {name: plain[f"tokenizer.{key}"] for key, name in fields.items() if f"tokenizer.{key}" in plain}
    converted, _ = convert_gguf_tokenizer(str(meta["general.architecture"]), tokenizer_dict)
    return converted


def main() -> None:
    _, meta = mx.load(str(smollm2_gguf()), return_metadata=True)  # type: ignore[misc]
    with tempfile.TemporaryDirectory() as folder:
        _write_tokenizer(meta, Path(folder))
        ours = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    theirs = transformers_tokenizer(meta)
    texts = [
        paragraph
        for pattern in ("src/**/*.py", "docs/**/*.md", "examples/**/*.jsonl")
        for path in sorted(ROOT.glob(pattern))
        for paragraph in path.read_text(encoding="utf-8").split("\n\n")
    ] + EDGE_CASES
    differing = [text for text in texts if ours.encode(text).ids != theirs.encode(text).ids]
    total = sum(len(ours.encode(text).ids) for text in texts)
    print(f"{len(texts)} texts, {total} tokens: {len(differing)} encode differently")  # noqa: T201
    for text in differing[:3]:
        a, b = ours.encode(text).tokens, theirs.encode(text).tokens
        at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        print(f"  ours {a[max(at - 2, 0) : at + 3]} transformers {b[max(at - 2, 0) : at + 3]}")  # noqa: T201


if __name__ == "__main__":
    main()
