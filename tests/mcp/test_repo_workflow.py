"""From a repository to an evaluated adapter in three tool calls, over stdio with a real client and real MLX:
build_dataset -> start_qlora_run -> evaluate, ending with held-out perplexity and function completion (with the
repository's own tests) for base and adapter, each change with its interval; and the prompt that walks an assistant
through it."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp import Client
from tests.conftest import tiny_run_config
from tests.mcp.test_stdio_e2e import follow_to_end, server_params

pytestmark = pytest.mark.slow  # real training and evaluation children


def small_repository(root: Path) -> Path:
    """Ten documented modules and unittest tests of them (the test command's baseline passes)."""
    package = root / "shapes"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for m in range(10):
        functions = "\n\n".join(
            textwrap.dedent(f'''
            def scale_{m}_{f}(values, factor={f + 1}):
                """Each value times the factor, then {m} added, as a new list."""
                scaled = [v * factor for v in values]
                return [v + {m} for v in scaled]
            ''').strip()
            for f in range(4)
        )
        (package / f"mod_{m}.py").write_text(f'"""Module {m}."""\n\n\n{functions}\n')
    tests = root / "tests"
    tests.mkdir()
    (tests / "__init__.py").write_text("")
    checks = "".join(
        f"        self.assertEqual(mod_{m}.scale_{m}_{f}([1, 2]), [{f + 1 + m}, {2 * (f + 1) + m}])\n"
        for m in range(10)
        for f in range(4)
    )
    imports = ", ".join(f"mod_{m}" for m in range(10))
    (tests / "test_shapes.py").write_text(
        f"import unittest\nfrom shapes import {imports}\n\n\nclass T(unittest.TestCase):\n    def test_all(self):\n"
        + checks
    )
    return root


async def _evaluated(client: Client, arguments: dict[str, Any]) -> dict[str, Any]:
    with anyio.fail_after(300):
        while True:  # evaluate answers within its wait; an assistant calls again to follow
            result = await client.call_tool("evaluate", arguments)
            assert not result.is_error, result.content
            state = dict(result.structured_content or {})
            if state["state"] != "running":
                return state


async def test_a_repository_to_an_evaluated_adapter_in_three_calls(tmp_path: Path, tiny_model: Path) -> None:
    repo = small_repository(tmp_path / "repo")
    out = tmp_path / "repo-dataset"
    async with Client(server_params(tmp_path / "home"), mode="legacy") as client:
        prompts = await client.list_prompts()
        assert {"tune_on_repository", "try_a_model", "fine_tune_and_follow"} <= {p.name for p in prompts.prompts}
        walk = await client.get_prompt("tune_on_repository", {"repository": str(repo), "model": str(tiny_model)})
        text = walk.messages[0].content.text  # type: ignore[union-attr]
        assert "build_dataset(" in text and "start_qlora_run(" in text and "evaluate(" in text

        built = await client.call_tool(
            "build_dataset", {"source": str(repo), "out": str(out), "format": "instruct", "model": str(tiny_model)}
        )
        assert not built.is_error, built.content
        splits = {s["split"]: s for s in built.structured_content["splits"]}  # type: ignore[index]
        assert splits["test"]["records"] >= 4 and splits["valid"]["records"] >= 4

        config = tiny_run_config(tiny_model, out, iters=20, max_seq_length=256)
        checked = await client.call_tool("validate_dataset", {"data": str(out), "model": str(tiny_model)})
        assert not checked.is_error and checked.structured_content["errors"] == 0  # type: ignore[index]
        predicted = await client.call_tool("profile_memory", {"config": config})
        assert not predicted.is_error and predicted.structured_content["prediction"]  # type: ignore[index]
        started = await client.call_tool("start_qlora_run", {"config": config})
        assert not started.is_error, started.content
        run_id = started.structured_content["run_id"]  # type: ignore[index]
        assert (await follow_to_end(client, run_id, []))["state"] == "succeeded"

        command = "python -m unittest discover -s tests -t ."
        state = await _evaluated(
            client, {"run_id": run_id, "humaneval_limit": 0, "completion_limit": 4, "test_command": command}
        )
    assert state["state"] == "succeeded", state.get("error")
    evaluation = state["evaluation"]
    assert [s["name"] for s in evaluation["scores"]] == ["base", "adapter"]
    for scores in evaluation["scores"]:
        held = scores["held_out"]
        assert held["unit"] == "function" and held["records"] == splits["test"]["records"] and held["tokens"] > 0
        assert held["loss"]["low"] <= held["loss"]["value"] <= held["loss"]["high"]
        assert held["units"] == []  # per-file sums stay in evaluation.json
        completion = scores["completion"]
        assert completion["functions"] == 4 and completion["results"] == []
        assert 0.0 <= completion["similarity"]["value"] <= 1.0
        assert completion["tests_passed"] is not None
    metrics = {c["metric"] for c in evaluation["changes"]}
    assert {"held-out loss", "held-out perplexity", "exact match", "similarity", "tests passed"} <= metrics
    for change in evaluation["changes"]:
        assert change["verdict"] in ("better", "worse", "no clear change")
        assert change["difference"]["low"] <= change["difference"]["value"] <= change["difference"]["high"]
