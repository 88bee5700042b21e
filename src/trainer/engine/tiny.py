"""A tiny qwen2 model (random weights, a byte-level BPE tokenizer trained here, a chat template) and a learnable
synthetic chat dataset: for tests, benchmarks and trying the runner in seconds without any download."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_ARGS: dict[str, Any] = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}
CORPUS_EXTRA = (
    "Write a Python function that returns the sum of a list of numbers. Use type hints and a docstring.\n"
    'def total(values: list[int]) -> int:\n    """Return the sum of values."""\n    return sum(values)\n'
    "The quick brown fox jumps over the lazy dog; reply with one code block and no prose.\n"
)
NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda_", "zeta"]


def synthetic_example(rng: random.Random) -> dict[str, Any]:
    """A tiny code task with one fixed answer pattern, so a few dozen steps visibly lower the loss."""
    name, number = rng.choice(NAMES), rng.randint(0, 99)
    return {
        "messages": [
            {"role": "user", "content": f"Write add_{name} adding {number}."},
            {"role": "assistant", "content": f"def add_{name}(x):\n    return x + {number}\n"},
        ]
    }


def write_synthetic_dataset(folder: Path, train: int = 200, valid: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("valid", valid)):
        lines = [json.dumps(synthetic_example(rng)) for _ in range(count)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_synthetic_preferences(folder: Path, train: int = 48, valid: int = 16, seed: int = 0) -> Path:
    """Preference pairs of the synthetic task: chosen adds the number asked for; rejected refuses (a reply the tiny
    model learns to rank lower within a few dozen steps)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("valid", valid)):
        lines = []
        for _ in range(count):
            messages = synthetic_example(rng)["messages"]
            rejected = "I will not write that.\n"
            record = {"prompt": messages[0]["content"], "chosen": messages[1]["content"], "rejected": rejected}
            lines.append(json.dumps(record))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _corpus() -> list[str]:
    """Fixed text (not source code, so that editing the package does not change the tokenizer, the tiny model and
    every test's losses): the synthetic task's phrasing and a few lines of Python and English."""
    rng = random.Random(1)
    return [json.dumps(synthetic_example(rng)) for _ in range(200)] + [CORPUS_EXTRA]


def build_tokenizer(folder: Path, vocab_size: int = 512) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "model_max_length": 1024,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    return int(tokenizer.get_vocab_size())


def build_tiny_model(folder: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a random-weight qwen2 model folder in MLX layout (float32, unquantized) and return it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder)
    padded_vocab = -(-vocab // 64) * 64  # a multiple of the quantization group size
    config = {**TINY_ARGS, "vocab_size": padded_vocab, **overrides}
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    config["eos_token_id"] = tokenizer["model"]["vocab"]["<|im_end|>"]
    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def write_synthetic_tasks(folder: Path, train: int = 16, valid: int = 8, seed: int = 0) -> Path:
    """grpo tasks of the synthetic kind: write add_<name>; the first test passes whenever the reply's code runs (a
    reward a random tiny model reaches now and then: an empty or one-word reply), the second only for the function."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("valid", valid)):
        lines = []
        for _ in range(count):
            name, number = rng.choice(NAMES), rng.randint(0, 99)
            tests = f"assert True\nassert add_{name}(1) == {number + 1}\n"
            lines.append(json.dumps({"prompt": f"Write add_{name} adding {number}.", "tests": tests}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
