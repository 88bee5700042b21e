"""validate_dataset: every planted problem found with its file and line, clean data passes, token counts equal
MLX-LM's own dataset processing (the tiny model and the bundled SmolLM2), and start_qlora_run refuses what would
fail mid-run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mcp_local_demo.bundled import house_style_data, smollm2_gguf
from trainer import ConfigError, QLoRAConfig, RunDefaults, prepare_run, validate_dataset
from trainer.engine.gguf import import_gguf

CHAT = {"messages": [{"role": "user", "content": "Write add_one."}, {"role": "assistant", "content": "def f(x): ..."}]}
#: a template that refuses a role, as real ones do (e.g. roles that must alternate)
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'critic' %}{{ raise_exception('critic is not a role here') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _lines(path: Path, records: list[object]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")


@pytest.fixture
def strict_model(tmp_path: Path, tiny_model: Path) -> Path:
    model = tmp_path / "strict-model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": STRICT_TEMPLATE}))
    return model


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    data = tmp_path / "planted"
    data.mkdir()
    long = {"messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "ok"}]}
    _lines(
        data / "train.jsonl",
        [
            CHAT,  # 1
            '{"messages": [',  # 2: broken JSON
            {"question": "q", "answer": "a"},  # 3: unknown format
            {"messages": []},  # 4: no messages
            {"messages": [{"content": "no role"}]},  # 5
            {"messages": [{"role": "critic", "content": "too slow"}]},  # 6: the template raises
            long,  # 7: over max_seq_length
            {"prompt": "p", "completion": "c"},  # 8: another format
            {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},  # 9: empty
        ],
    )
    _lines(
        data / "valid.jsonl",
        [{"messages": [{"role": "user", "content": "new"}, {"role": "assistant", "content": "y"}]}, CHAT],
    )
    (data / "test.jsonl").write_bytes(json.dumps(CHAT).encode() + b"\n\xff\xfe\n")
    return data


def test_every_planted_problem_is_found_with_its_line(planted: Path, strict_model: Path) -> None:
    report = validate_dataset(planted, strict_model, max_seq_length=128)
    found = {(Path(p.file).name, p.line, p.kind) for p in report.problems}
    assert found == {
        ("train.jsonl", 2, "json"),
        ("train.jsonl", 3, "format"),
        ("train.jsonl", 4, "roles"),
        ("train.jsonl", 5, "roles"),
        ("train.jsonl", 6, "template"),
        ("train.jsonl", 6, "empty"),  # 'critic' is not a role we know either
        ("train.jsonl", 7, "too_long"),
        ("train.jsonl", 8, "format"),
        ("train.jsonl", 9, "empty"),
        ("valid.jsonl", 2, "duplicate"),
        ("test.jsonl", 1, "duplicate"),  # of train.jsonl line 1: a test split must be unseen too
        ("test.jsonl", 2, "encoding"),
    }
    assert not report.ok and report.errors == 7 and report.warnings == 5
    template = next(p for p in report.problems if p.kind == "template")
    assert "critic is not a role here" in template.message
    assert [p.kind in {"json", "format", "roles", "template", "encoding"} for p in report.problems][:7] == [True] * 7
    train = report.splits[0]
    assert (train.split, train.examples, train.truncated) == ("train", 4, 1)  # lines 1, 6, 7, 9 parse as chats
    assert train.tokens_max is not None and train.tokens_max > 128


def test_clean_data_passes_and_its_counts_equal_mlx_lm(tiny_model: Path, tiny_data: Path) -> None:
    report = validate_dataset(tiny_data, tiny_model, max_seq_length=2048, mask_prompt=True)
    assert report.ok and report.format == "chat"
    assert set(report.problem_counts) <= {"duplicate"}  # the synthetic splits share a few examples
    expected = _mlx_lm_counts(tiny_model, tiny_data / "train.jsonl", mask_prompt=True)
    train = report.splits[0]
    assert (train.examples, train.tokens_total, train.tokens_trained) == expected


@pytest.mark.slow
def test_the_house_style_dataset_with_smollm2s_template_counts_like_mlx_lm(tmp_path: Path) -> None:
    model = import_gguf(smollm2_gguf(), tmp_path / "smollm2")
    report = validate_dataset(house_style_data(), model, max_seq_length=512, mask_prompt=True)
    assert report.ok, report.problems[:3]
    train = report.splits[0]
    assert (train.examples, train.tokens_total, train.tokens_trained) == _mlx_lm_counts(
        model, house_style_data() / "train.jsonl", mask_prompt=True
    )
    assert train.tokens_p50 is not None and train.tokens_p50 <= train.tokens_max  # type: ignore[operator]


def _mlx_lm_counts(model: Path, train: Path, *, mask_prompt: bool) -> tuple[int, int, int]:
    """What MLX-LM's own ChatDataset makes of the file: examples, tokens, tokens after the prompt offset."""
    from mlx_lm.tuner.datasets import ChatDataset
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model)
    records = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    dataset = ChatDataset(records, tokenizer, mask_prompt=mask_prompt)
    processed = [dataset.process(record) for record in records]
    return len(records), sum(len(t) for t, _ in processed), sum(len(t) - offset for t, offset in processed)


def test_start_refuses_a_dataset_whose_template_fails_and_writes_nothing(tmp_path: Path, strict_model: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    critic = {"messages": [{"role": "critic", "content": "no"}, {"role": "assistant", "content": "x"}]}
    _lines(data / "train.jsonl", [CHAT, CHAT, CHAT, critic])
    defaults = RunDefaults.for_home(tmp_path / "home", roots=(tmp_path,))
    config = QLoRAConfig.parse({"model": str(strict_model), "data": str(data), "batch_size": 2, "num_layers": 4})
    with pytest.raises(ConfigError, match=r"train.jsonl line 4: the chat template fails.*critic is not a role here"):
        prepare_run(config, defaults)
    assert not (tmp_path / "home" / "runs").exists() or not any((tmp_path / "home" / "runs").iterdir())


def test_the_cli_reports_and_exits_nonzero_on_errors(planted: Path, strict_model: Path) -> None:
    cmd = [sys.executable, "-m", "trainer", "validate", str(planted), "--model", str(strict_model)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and json.loads(done.stdout)["errors"] == 7
    assert "7 error(s)" in done.stderr
