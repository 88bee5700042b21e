"""validate_dataset and export_model over MCP: a dataset checked before a run; an adapter fused into its base and
written as GGUF in one call after it; refusals as tool errors that name the fix, with nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcp import Client
from tests.mcp.conftest import fake_server
from tests.trainer.test_results import random_adapter

pytestmark = pytest.mark.slow  # real MLX: export and evaluate over MCP


async def test_export_model_fuses_then_writes_gguf_reusing_the_fused_folder(tmp_path: Path, tiny_model: Path) -> None:
    adapters = tmp_path / "work"
    adapter = random_adapter(tiny_model, adapters / "style")
    async with Client(fake_server(tmp_path / "home", roots=(tiny_model.parent, adapters)), mode="legacy") as client:
        mlx_only = await client.call_tool(
            "export_model", {"model": str(tiny_model), "adapter": str(adapter), "gguf": None}
        )
        assert not mlx_only.is_error, mlx_only.content
        fused = mlx_only.structured_content["fused"]  # type: ignore[index]
        assert fused["path"] == str(adapters / "style-fused") and mlx_only.structured_content["gguf"] is None  # type: ignore[index]
        loaded = await client.call_tool("load_model", {"path": fused["path"]})
        assert not loaded.is_error, loaded.content

        both = await client.call_tool("export_model", {"model": str(tiny_model), "adapter": str(adapter)})
        assert not both.is_error, both.content
        result = both.structured_content
        assert result["fused"]["seconds"] == 0.0  # type: ignore[index]  # the folder above, reused
        assert result["gguf"]["path"] == str(adapters / "style-f16.gguf")  # type: ignore[index]
        assert result["gguf"]["check"]["equal_prefix"] == 32  # type: ignore[index]
        text = both.content[0].text  # type: ignore[union-attr]
        assert "32 of 32 greedy tokens as the source" in text.splitlines()[0]

        again = await client.call_tool("export_model", {"model": str(tiny_model), "adapter": str(adapter)})
        assert again.is_error and "exists already; choose a new file name" in again.content[0].text  # type: ignore[union-attr]
        nothing = await client.call_tool("export_model", {})
        assert nothing.is_error and "name a run (run_id), or a model" in nothing.content[0].text  # type: ignore[union-attr]
        outside = await client.call_tool(
            "export_model", {"model": str(tiny_model), "adapter": str(adapter), "out": "/etc/x.gguf"}
        )
        assert outside.is_error and "/etc/x.gguf" in outside.content[0].text  # type: ignore[union-attr]
        no_run = await client.call_tool("export_model", {"run_id": "nope"})
        assert no_run.is_error and "nope" in no_run.content[0].text  # type: ignore[union-attr]
    assert sorted(p.name for p in adapters.iterdir()) == ["style", "style-f16.gguf", "style-fused"]


async def test_validate_dataset_reports_over_mcp(tmp_path: Path, tiny_model: Path, tiny_data: Path) -> None:
    async with Client(fake_server(tmp_path / "home", roots=(tiny_model.parent, tiny_data)), mode="legacy") as client:
        checked = await client.call_tool(
            "validate_dataset", {"data": str(tiny_data), "model": str(tiny_model), "mask_prompt": True}
        )
        assert not checked.is_error, checked.content
        report = checked.structured_content
        assert report["errors"] == 0 and report["splits"][0]["tokens_trained"] > 0  # type: ignore[index]
        assert checked.content[0].text.startswith(f"{tiny_data}: ok")  # type: ignore[union-attr]
        missing = await client.call_tool("validate_dataset", {"data": str(tiny_data / "nope")})
        assert missing.is_error and "has no train.jsonl" in missing.content[0].text  # type: ignore[union-attr]
        outside = await client.call_tool("validate_dataset", {"data": "/etc"})
        assert outside.is_error and "/etc" in outside.content[0].text  # type: ignore[union-attr]


async def test_evaluate_follows_a_background_evaluation_and_answers_a_finished_one(
    tmp_path: Path, tiny_model: Path
) -> None:
    async with Client(fake_server(tmp_path / "home", roots=(tiny_model.parent,)), mode="legacy") as client:
        first = await client.call_tool("evaluate", {"model": str(tiny_model), "humaneval_limit": 1})
        assert not first.is_error, first.content
        result = first.structured_content
        assert result["state"] == "succeeded" and result["done"] == result["total"] == 1  # type: ignore[index]
        assert result["evaluation"]["scores"][0]["humaneval_problems"] == []  # type: ignore[index]  # in the file
        folder = Path(result["folder"])  # type: ignore[index]
        assert folder.parent == tmp_path / "home" / "evaluations"
        assert not (folder / "evaluation.pid").exists()  # ended: no stale pid file left behind
        written = (folder / "evaluation.json").stat().st_mtime_ns
        again = await client.call_tool("evaluate", {"model": str(tiny_model), "humaneval_limit": 1})
        assert again.structured_content["state"] == "succeeded"  # type: ignore[index]
        assert (folder / "evaluation.json").stat().st_mtime_ns == written  # the finished one, not redone


async def test_a_grpo_run_over_mcp_checks_its_tasks_and_reports_rewards(tmp_path: Path, tiny_model: Path) -> None:
    """validate_dataset names the tasks' format; a mode that does not fit the data is a tool error naming both; a
    grpo run followed to its end carries its rewards in run_status."""
    import anyio

    from mcp_local import ServerSettings, build_server
    from tests.conftest import tiny_run_config
    from tests.trainer.test_grpo import _settings
    from trainer.engine.tiny import write_synthetic_tasks

    tasks = write_synthetic_tasks(tmp_path / "tasks")
    async with Client(build_server(ServerSettings(home=tmp_path / "home")), mode="legacy") as client:
        checked = await client.call_tool("validate_dataset", {"data": str(tasks), "model": str(tiny_model)})
        assert not checked.is_error and checked.structured_content["format"] == "tests", checked.content  # type: ignore[index]
        wrong = await client.call_tool("start_qlora_run", {"config": tiny_run_config(tiny_model, tasks)})
        assert wrong.is_error and "set mode to 'grpo'" in wrong.content[0].text  # type: ignore[union-attr]
        started = await client.call_tool("start_qlora_run", {"config": _settings(tiny_model, tasks, iters=6)})
        assert not started.is_error, started.content
        run_id = started.structured_content["run_id"]  # type: ignore[index]
        with anyio.fail_after(300):
            while True:
                status = await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 60, "until": "end"})
                if status.structured_content["state"] in ("succeeded", "failed", "cancelled"):  # type: ignore[index]
                    break
    final = status.structured_content
    assert final["state"] == "succeeded", final  # type: ignore[index]
    metrics = final["metrics"]  # type: ignore[index]
    assert metrics["last_reward"] is not None and metrics["last_val_reward"] is not None
