"""Memory: prediction through profile_memory, refusal and fit_to_budget in start_qlora_run, and the watchdog."""

from __future__ import annotations

from pathlib import Path

import anyio
import psutil
import pytest

from mcp import Client
from mcp_local import ServerSettings, build_server
from tests.conftest import tiny_run_config


def tiny_config(model: Path, data: Path, **extra: object) -> dict[str, object]:
    return tiny_run_config(model, data, **{"iters": 20, **extra})


async def _predicted(client: Client, config: dict[str, object]) -> float:
    result = await client.call_tool("profile_memory", {"config": config})
    assert not result.is_error, result.content[0].text
    return float(result.structured_content["prediction"]["prediction"]["total_gb"])


async def test_profile_memory_predicts_a_run_by_part_without_loading_it(tmp_path: Path, tiny_model, tiny_data) -> None:
    async with Client(build_server(ServerSettings(home=tmp_path)), mode="legacy") as client:
        result = await client.call_tool("profile_memory", {"config": tiny_config(tiny_model, tiny_data)})
        body = result.structured_content["prediction"]
        parts = body["prediction"]
        assert parts["total_gb"] == pytest.approx(
            sum(parts[k] for k in ("weights_gb", "lora_gb", "activations_gb", "logits_gb", "slack_gb"))
        )
        assert body["fits"] and body["budget_gb"] == pytest.approx(
            min(16, 0.75 * psutil.virtual_memory().total / 1e9), abs=0.01
        )
        assert body["plan"]["seq_len"] < 128  # the longest example, counted with the model's tokenizer
        assert "predicted peak" in result.content[0].text
        short = await client.call_tool("profile_memory", {"config": {"model": str(tiny_model), "max_seq_length": 256}})
        long = await client.call_tool("profile_memory", {"config": {"model": str(tiny_model), "max_seq_length": 1024}})
        nameless = await client.call_tool("profile_memory", {"config": {"max_seq_length": 256}})
        assert nameless.is_error and "config needs a model" in nameless.content[0].text
        small = short.structured_content["prediction"]["prediction"]["total_gb"]
        assert long.structured_content["prediction"]["prediction"]["total_gb"] > small
        ckpt = await client.call_tool(
            "profile_memory",
            {
                "config": {
                    "model": str(tiny_model),
                    "max_seq_length": 1024,
                    "grad_checkpoint": True,
                    "chunked_loss": True,
                }
            },
        )
        assert (
            ckpt.structured_content["prediction"]["prediction"]["total_gb"]
            < long.structured_content["prediction"]["prediction"]["total_gb"]
        )


async def test_a_run_predicted_over_budget_is_refused_with_settings_that_fit(
    tmp_path: Path, tiny_model, tiny_data
) -> None:
    async with Client(build_server(ServerSettings(home=tmp_path)), mode="legacy") as client:
        plain = await _predicted(client, tiny_config(tiny_model, tiny_data))
        saving = await _predicted(client, tiny_config(tiny_model, tiny_data, grad_checkpoint=True, chunked_loss=True))
        assert saving < plain
        budget = round((plain + saving) / 2, 6)
        refused = await client.call_tool(
            "start_qlora_run", {"config": tiny_config(tiny_model, tiny_data, memory_budget_gb=budget)}
        )
        assert refused.is_error
        text = refused.content[0].text
        assert f"over its memory budget of {budget:.2f} GB" in text and "predicted to peak at" in text
        assert "these settings would fit" in text and "grad_checkpoint=true" in text and "fit_to_budget" in text
        assert (await client.call_tool("list_runs", {})).structured_content["runs"] == []

        fitted = await client.call_tool(
            "start_qlora_run",
            {"config": tiny_config(tiny_model, tiny_data, memory_budget_gb=budget, fit_to_budget=True)},
        )
        assert not fitted.is_error, fitted.content[0].text
        run_id = fitted.structured_content["run_id"]
        assert fitted.structured_content["predicted_peak_gb"] <= budget
        status = await client.call_tool("run_status", {"run_id": run_id, "include_config": True})
        assert status.structured_content["config"]["grad_checkpoint"] is True
        await client.call_tool("cancel_run", {"run_id": run_id})

        profile = await client.call_tool(
            "profile_memory", {"config": tiny_config(tiny_model, tiny_data, memory_budget_gb=budget)}
        )
        prediction = profile.structured_content["prediction"]  # type: ignore[index]
        fitting = [p for p in prediction["plans"] if p["fits"]]
        fastest = max(fitting, key=lambda p: p["relative_speed"])
        assert prediction["choice"].startswith(", ".join(f"{k}={v}" for k, v in fastest["settings"].items()))
        assert "fit_to_budget would take" in profile.content[0].text  # the choice, said to the assistant


@pytest.mark.slow
async def test_a_run_that_grows_past_its_budget_is_stopped_with_its_adapter_saved(
    tmp_path: Path, tiny_model, tiny_data
) -> None:
    config = tiny_config(
        tiny_model, tiny_data, iters=5000, memory_budget_gb=0.006, allow_over_budget=True, memory_sample_interval=0.1
    )
    async with Client(build_server(ServerSettings(home=tmp_path)), mode="legacy") as client:
        started = await client.call_tool("start_qlora_run", {"config": config})
        assert not started.is_error, started.content[0].text
        run_id = started.structured_content["run_id"]
        with anyio.fail_after(120):
            status = started.structured_content
            while True:
                status = (
                    await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 5})
                ).structured_content
                if status["state"] in ("succeeded", "failed", "cancelled"):
                    break
        assert status["state"] == "failed", status
        error = status["error"]
        assert error["kind"] == "memory_budget" and "over the run's budget of 0.006 GB" in error["message"]
        assert status["iteration"] < 5000
        assert (Path(status["adapter_path"]) / "adapters.safetensors").is_file()
        assert (await client.call_tool("profile_memory", {})).structured_content["workers"] == []
