"""Tools through the SDK's in-memory client (both protocol eras): schemas, results, and every error path."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp import Client, MCPError
from tests.mcp.conftest import fake_server, text_json, without_nulls
from tests.trainer.helpers import config
from trainer import ConfigError, QLoRAConfig

MODES = ["legacy", "auto"]
TOOLS = {
    "load_model",
    "generate",
    "profile_memory",
    "start_qlora_run",
    "run_status",
    "cancel_run",
    "resume_run",
    "list_runs",
    "delete_run",
    "list_models",
    "export_model",
    "validate_dataset",
    "build_dataset",
    "evaluate",
}


@pytest.mark.parametrize("mode", MODES)
async def test_tools_have_output_schemas_and_honest_annotations(tmp_path: Path, mode: str) -> None:
    async with Client(fake_server(tmp_path), mode=mode) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.output_schema is not None and tool.description and tool.annotations
    read_only = {name for name, t in tools.items() if t.annotations and t.annotations.read_only_hint}
    assert read_only == {"generate", "profile_memory", "run_status", "list_runs", "list_models", "validate_dataset"}
    assert tools["cancel_run"].annotations.destructive_hint is True
    assert tools["delete_run"].annotations.destructive_hint is True
    assert tools["delete_run"].annotations.idempotent_hint is True  # the spec reads it only off read-only tools
    assert tools["run_status"].annotations.idempotent_hint is None
    assert "rank" in json.dumps(tools["start_qlora_run"].input_schema)


@pytest.mark.parametrize("mode", MODES)
async def test_a_run_followed_with_run_status_alone(tmp_path: Path, fake_model, tiny_data, mode: str) -> None:
    async with Client(fake_server(tmp_path), mode=mode) as client:
        started = await client.call_tool("start_qlora_run", {"config": config(fake_model, tiny_data)})
        assert not started.is_error
        summary, body = text_json(started)
        assert body == without_nulls(started.structured_content) and summary.startswith(f"run {body['run_id']} queued")
        run_id = body["run_id"]
        with anyio.fail_after(30):
            while True:
                status = await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 5})
                if status.structured_content["state"] == "succeeded":
                    break
        summary, body = text_json(status)
        assert body == without_nulls(status.structured_content)
        assert summary.startswith(f"run {run_id}: succeeded, iteration 5/5") and "adapter" in summary
        assert body["progress_percent"] == 100.0 and body["metrics"]["last_val_loss"] == 0.5
        listing = await client.call_tool("list_runs", {"state": "succeeded"})
        assert [r["id"] for r in listing.structured_content["runs"]] == [run_id]
        resources = {str(r.uri) for r in (await client.list_resources()).resources}
        assert {f"runs://{run_id}/status", f"runs://{run_id}/memory", f"runs://{run_id}/metrics"} <= resources
        metrics = json.loads((await client.read_resource(f"runs://{run_id}/metrics")).contents[0].text)
        assert [r["iteration"] for r in metrics["train"]] == [1, 2, 3, 4, 5]


async def test_wait_seconds_is_capped_on_a_running_run(
    tmp_path: Path, fake_model, tiny_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung run never changes: the long-poll must end at the cap; more than the schema's 60 s is refused."""
    from mcp_local import run_tools

    monkeypatch.setattr(run_tools, "MAX_WAIT_S", 1.5)
    async with Client(fake_server(tmp_path, "hang"), mode="legacy") as client:
        run_id = (
            await client.call_tool("start_qlora_run", {"config": config(fake_model, tiny_data)})
        ).structured_content["run_id"]
        with anyio.fail_after(60):
            while (await client.call_tool("run_status", {"run_id": run_id})).structured_content["iteration"] < 1:
                await anyio.sleep(0.2)
        tic = time.monotonic()
        waited = await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 1.5})  # the cap, patched
        took = time.monotonic() - tic
        refused = await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 600})
        await client.call_tool("cancel_run", {"run_id": run_id})
    assert not waited.is_error and waited.structured_content["state"] == "running"
    assert 1.0 < took < 20
    assert refused.is_error and "wait_seconds" in refused.content[0].text and "1.5 (got 600)" in refused.content[0].text


async def test_wait_seconds_answers_at_once_for_a_finished_run(tmp_path: Path, fake_model, tiny_data) -> None:
    async with Client(fake_server(tmp_path), mode="legacy") as client:
        run_id = (
            await client.call_tool("start_qlora_run", {"config": config(fake_model, tiny_data)})
        ).structured_content["run_id"]
        with anyio.fail_after(30):
            while (await client.call_tool("run_status", {"run_id": run_id})).structured_content["state"] != "succeeded":
                await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 1})
        with anyio.fail_after(5):
            done = await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 60})
    assert not done.is_error


ERROR_CASES = [
    ("run_status", {"run_id": "nope"}, "no run with id 'nope'; call list_runs"),
    ("cancel_run", {"run_id": "nope"}, "no run with id 'nope'"),
    ("generate", {"prompt": "hi", "run_id": "nope"}, "no run with id 'nope'"),
    ("generate", {"prompt": "hi"}, "no model is loaded; call load_model"),
    ("generate", {"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, "exactly one of prompt"),
    ("load_model", {"path": "/no/such/model"}, "model path '/no/such/model' does not exist"),
    ("load_model", {"path": "TMP"}, "is not a model folder: it has no config.json"),
    ("start_qlora_run", {"config": {"model": "/no/such/model", "data": "/tmp"}}, "model path '/no/such/model'"),
    ("start_qlora_run", {"config": "RANK0"}, "greater than or equal to 1"),
    ("start_qlora_run", {"config": "TYPO"}, "learning_rat"),
    ("start_qlora_run", {"config": "NO_DATA"}, "data folder '/no/such/data' does not exist"),
    ("list_runs", {"state": "exploded"}, "state"),
]


@pytest.mark.parametrize(("tool", "args", "expected"), ERROR_CASES)
async def test_bad_calls_are_tool_errors_that_name_the_value_and_the_fix(
    tmp_path: Path, fake_model, tiny_data, tool: str, args: dict, expected: str
) -> None:
    replacements = {
        "RANK0": config(fake_model, tiny_data, rank=0),
        "TYPO": config(fake_model, tiny_data, learning_rat=0.1),
        "NO_DATA": config(fake_model, Path("/no/such/data")),
    }
    if isinstance(args.get("config"), str):
        args = {"config": replacements[args["config"]]}
    if args.get("path") == "TMP":
        args = {"path": str(tmp_path)}
    async with Client(fake_server(tmp_path / "home"), mode="legacy") as client:
        result = await client.call_tool(tool, args)
        assert result.is_error
        text = result.content[0].text
        assert expected in text and "Traceback" not in text
        assert (await client.call_tool("list_runs", {})).structured_content["runs"] == []


async def test_cancelling_a_finished_run_and_using_a_run_without_adapter_are_errors(
    tmp_path: Path, fake_model, tiny_data
) -> None:
    async with Client(fake_server(tmp_path, mode="fail"), mode="legacy") as client:
        run_id = (
            await client.call_tool("start_qlora_run", {"config": config(fake_model, tiny_data)})
        ).structured_content["run_id"]
        with anyio.fail_after(30):
            status = await client.call_tool("run_status", {"run_id": run_id})
            while status.structured_content["state"] != "failed":
                status = await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 5})
        assert "error (backend): RuntimeError: the fake backend failed on purpose" in status.content[0].text
        cancel = await client.call_tool("cancel_run", {"run_id": run_id})
        assert cancel.is_error and "already ended (failed)" in cancel.content[0].text
        gen = await client.call_tool("generate", {"prompt": "x", "run_id": run_id})
        assert gen.is_error and "has no adapter yet" in gen.content[0].text


async def test_unknown_run_resource_is_not_found(tmp_path: Path) -> None:
    async with Client(fake_server(tmp_path), mode="legacy") as client:
        with pytest.raises(MCPError, match="no run with id 'nope'"):
            await client.read_resource("runs://nope/memory")


async def test_profile_memory_reports_server_and_system(tmp_path: Path) -> None:
    async with Client(fake_server(tmp_path), mode="auto") as client:
        result = await client.call_tool("profile_memory", {})
    body = result.structured_content
    assert body is not None and body["server"]["rss_gb"] > 0
    assert body["system_total_gb"] >= body["system_available_gb"] > 0
    assert body["workers"] == [] and body["loaded_models"] == []


@pytest.mark.parametrize(
    "bad",
    [{"rank": 0}, {"learning_rat": 0.1}, {"iters": "many"}, {"model": None}, {"data": "x" * 500, "rank": -1}],
)
async def test_argument_errors_read_as_the_clis_messages_not_raw_pydantic(
    tmp_path: Path, fake_model, tiny_data, bad: dict
) -> None:
    raw = {**config(fake_model, tiny_data), **bad}
    with pytest.raises(ConfigError) as cli_error:  # what `python -m trainer run` says for the same config
        QLoRAConfig.parse(raw)
    async with Client(fake_server(tmp_path / "home"), mode="legacy") as client:
        result = await client.call_tool("start_qlora_run", {"config": raw})
        other = await client.call_tool("list_runs", {"limit": 0, "state": "nope"})
    assert result.is_error and result.content[0].text == f"start_qlora_run: {cli_error.value}"
    assert other.is_error and other.content[0].text.startswith("list_runs: invalid arguments: ")
    for text in (result.content[0].text, other.content[0].text):
        assert "pydantic.dev" not in text and "validation error for" not in text and len(text) < 600


async def test_a_damaged_gguf_is_a_tool_error_and_the_server_lives_on(tmp_path: Path, tiny_data) -> None:
    """MLX's GGUF reader can crash the process on a malformed file: the import runs in a subprocess of its own."""
    from mcp_local_demo.bundled import smollm2_gguf

    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(smollm2_gguf().read_bytes()[:88])  # a real header, then nothing
    calls: list[tuple[str, dict[str, Any]]] = [
        ("load_model", {"path": str(damaged)}),
        ("profile_memory", {"model": str(damaged)}),
        ("start_qlora_run", {"config": config(damaged, tiny_data)}),
    ]
    async with Client(fake_server(tmp_path / "home"), mode="legacy") as client:
        for tool, args in calls:
            result = await client.call_tool(tool, args)
            assert result.is_error, tool
            assert "damaged.gguf" in result.content[0].text and "Traceback" not in result.content[0].text
        assert (await client.call_tool("list_runs", {})).structured_content["runs"] == []  # nothing half-written
        assert not (await client.call_tool("profile_memory", {})).is_error  # the server is still here


async def test_the_instructions_name_every_tool_and_prompt(tmp_path: Path) -> None:
    async with Client(fake_server(tmp_path / "home"), mode="legacy") as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        prompts = {p.name for p in (await client.list_prompts()).prompts}
        instructions = client.instructions or ""
    assert len(tools) == 14 and len(prompts) == 3
    assert not [name for name in tools | prompts if name not in instructions]
