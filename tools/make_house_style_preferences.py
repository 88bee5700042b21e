"""Writes the bundled house-style preference pairs: preferences/{train,valid,test}.jsonl beside the house-style
dataset, one {"prompt", "chosen", "rejected"} record per prompt, where `chosen` is the house-style answer and
`rejected` is the bundled base model's own reply to the same prompt (SmolLM2-135M-Instruct, greedy, at most 160
tokens, cut after its first code block). train (210) and valid (42) come from the first house-style train and valid records; test (72) from its held-out functions, which
no training record names (six phrasings each). Written for this project (MIT, like the code). Re-run to regenerate
(a few minutes on two CPU cores):
    uv run python tools/make_house_style_preferences.py
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_house_style_dataset import HELDOUT, PHRASINGS, SPECS, answer  # noqa: E402

from mcp_local_demo.bundled import house_style_data, smollm2_gguf  # noqa: E402
from trainer.engine.gguf import cached_import  # noqa: E402
from trainer.engine.inference import ModelSession  # noqa: E402

MAX_TOKENS = 160
#: pairs per split (the house-style train and valid records in their order; the held-out functions' six phrasings)
COUNTS = {"train": 210, "valid": 42}


def _code_closed(text: str) -> bool:
    """The reply's first code block is closed: what follows is the model's prose about it, cut to save time."""
    return text.count("```") >= 2


def main() -> None:
    folder = house_style_data()
    out = folder.parent / "house_style_preferences"
    out.mkdir(exist_ok=True)
    models = Path("demo-output") / "models"
    model = cached_import(smollm2_gguf(), models)
    session = ModelSession()
    session.load(str(model))
    splits: dict[str, list[tuple[str, str]]] = {}
    for split in ("train", "valid"):
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        splits[split] = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows[: COUNTS[split]]]
    splits["test"] = [
        (phrasing.format(name=spec[0], task=spec[4]), answer(*spec[:4]))
        for spec in SPECS[-HELDOUT:]
        for phrasing in PHRASINGS
    ]
    functions = [spec[0] for spec in SPECS[-HELDOUT:] for _ in PHRASINGS]  # evaluate's units: a function's pairs
    for split, pairs in splits.items():
        lines = []
        for number, (prompt, chosen) in enumerate(pairs, start=1):
            reply = session.generate(prompt, max_tokens=MAX_TOKENS, stop_when=_code_closed).text.strip()
            record = {"prompt": prompt, "chosen": chosen, "rejected": reply}
            if split == "test":
                record["function"] = functions[number - 1]
            lines.append(json.dumps(record))
            logging.info("%s %d/%d", split, number, len(pairs))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    from trainer.environment.preload import reexec_with_preloads

    reexec_with_preloads()  # OpenBLAS under MLX: the reference BLAS of the mlx[cpu] wheel prefills 5x slower
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    main()
