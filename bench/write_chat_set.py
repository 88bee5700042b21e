"""The chat records of bench/gpu_plans.py and the tokenizer they are counted with, written on this machine, for a
machine without MLX (the Hugging Face side-by-side needs only these: bench/gpu_hf_qlora.py --chat DIR/chat --tokenizer
DIR/model --checkpointing).

uv run python bench/write_chat_set.py DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gpu_plans import build_chat  # noqa: E402
from memory_prediction import SHAPES  # noqa: E402

from trainer.engine.tiny import build_tokenizer  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    model = out / "model"
    model.mkdir(parents=True, exist_ok=True)
    build_tokenizer(model)
    config = dict(SHAPES["qwen2.5-coder-7b"], model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6)
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")  # what AutoTokenizer reads
    build_chat(out / "chat")
    print(out)


if __name__ == "__main__":
    main()
