"""Nothing a user owns is lost, tried over MCP stdio against the real server and real worker subprocesses: delete_run
removes only the files a run wrote, an adapter_dir that would mix with the user's own folders is refused, and twenty
concurrent cancels keep the save."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp import Client, StdioServerParameters
from tests.trainer.helpers import config, fake_env, tree_hashes

pytestmark = pytest.mark.slow
TIMEOUT = 60


def fake_stdio(home: Path, mode: str, **env: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_local", "--home", str(home), "--root", tempfile.gettempdir()],
        env={"PATH": os.environ.get("PATH", ""), **fake_env(mode), **env},
    )


async def until_ended(client: Client, run_id: str) -> dict[str, Any]:
    with anyio.fail_after(TIMEOUT):
        while True:
            status = (await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 5})).structured_content
            assert status is not None
            if status["state"] in ("succeeded", "failed", "cancelled"):
                return status


async def start(client: Client, cfg: dict[str, Any]) -> str:
    started = await client.call_tool("start_qlora_run", {"config": cfg})
    assert not started.is_error, started.content
    return str(started.structured_content["run_id"])  # type: ignore[index]


async def test_delete_run_leaves_every_byte_it_did_not_write(tmp_path: Path, fake_model: Path, tiny_data: Path) -> None:
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's notes")
    created = tmp_path / "new" / "adapter"
    before = {p: tree_hashes(p) for p in (fake_model, tiny_data)}
    async with Client(fake_stdio(tmp_path / "home", "succeed"), mode="legacy") as client:
        shared = await start(client, config(fake_model, tiny_data, iters=3, adapter_dir=str(mine)))
        fresh = await start(client, config(fake_model, tiny_data, iters=3, adapter_dir=str(created)))
        changed = await start(client, config(fake_model, tiny_data, iters=3, adapter_dir=str(tmp_path / "edited")))
        for run_id in (shared, fresh, changed):
            assert (await until_ended(client, run_id))["state"] == "succeeded"
        (tmp_path / "edited" / "adapter_config.json").write_text('{"edited": "by the user"}')

        deleted = await client.call_tool("delete_run", {"run_id": shared})
        assert not deleted.is_error, deleted.content
        assert (mine / "notes.txt").read_text() == "a user's notes"  # the folder was the user's: it stays
        assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
        removed = deleted.structured_content["removed"]  # type: ignore[index]
        assert str(mine / "adapters.safetensors") in removed and str(mine) not in removed

        deleted = await client.call_tool("delete_run", {"run_id": fresh})
        assert not deleted.is_error and not created.exists() and not created.parent.exists()  # the run made both

        deleted = await client.call_tool("delete_run", {"run_id": changed})
        assert not deleted.is_error
        assert sorted(p.name for p in (tmp_path / "edited").iterdir()) == ["adapter_config.json"]
        kept = deleted.structured_content["kept"]  # type: ignore[index]
        assert any("changed since the run wrote it" in k for k in kept), kept
    assert {p: tree_hashes(p) for p in (fake_model, tiny_data)} == before


async def test_an_adapter_dir_over_the_users_folders_is_refused_before_anything_is_written(
    tmp_path: Path, fake_model: Path, tiny_data: Path
) -> None:
    home = tmp_path / "home"
    async with Client(fake_stdio(home, "succeed"), mode="legacy") as client:
        for folder, what in [
            (home, "the server's home"),
            (tiny_data, "the dataset's folder"),
            (fake_model, "the model's folder"),
            (tmp_path, "the server's home"),  # above the home, the model and the data
        ]:
            refused = await client.call_tool(
                "start_qlora_run", {"config": config(fake_model, tiny_data, adapter_dir=str(folder))}
            )
            assert refused.is_error, folder
            text = refused.content[0].text  # type: ignore[union-attr]
            assert str(folder) in text and what in text and "pick a new or empty folder" in text
        assert (await client.call_tool("list_runs", {})).structured_content["runs"] == []  # type: ignore[index]


async def test_twenty_concurrent_cancel_run_calls_keep_the_save(
    tmp_path: Path, fake_model: Path, tiny_data: Path
) -> None:
    server = fake_stdio(tmp_path / "home", "stepwise", FAKE_STEP_S="0.2", FAKE_SAVE_S="2")
    async with Client(server, mode="legacy") as client:
        run_id = await start(client, config(fake_model, tiny_data, iters=1000))
        with anyio.fail_after(TIMEOUT):
            while (await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 2})).structured_content[
                "iteration"  # type: ignore[index]
            ] < 3:
                pass
        answers: list[Any] = []

        async def cancel() -> None:
            answers.append(await client.call_tool("cancel_run", {"run_id": run_id}))

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(cancel)
                    await anyio.sleep(0.05)
        status = await until_ended(client, run_id)
    assert status["state"] == "cancelled"
    assert all(not a.is_error and a.structured_content["state"] == "cancelled" for a in answers)
    assert Path(status["adapter_path"], "adapters.safetensors").read_bytes().startswith(b"step ")


async def test_a_huge_prompt_is_refused_before_it_is_tokenized(tmp_path: Path, tiny_model: Path) -> None:
    import psutil

    async with Client(fake_stdio(tmp_path / "home", "succeed"), mode="legacy") as client:
        assert not (await client.call_tool("load_model", {"path": str(tiny_model)})).is_error
        server = next(p for p in psutil.Process().children(recursive=True) if "mcp_local" in " ".join(p.cmdline()))
        huge: list[dict[str, Any]] = [
            {"prompt": "def f():\n    return 1\n" * 2_300_000},  # 50 MB
            {"messages": [{"role": "user", "content": "x" * 25_000}] * 2_000},  # 2,000 messages of 25 KB
        ]
        for arguments in huge:
            started = time.monotonic()
            refused = await client.call_tool("generate", {**arguments, "max_tokens": 8})
            took = time.monotonic() - started
            assert refused.is_error
            text = refused.content[0].text  # type: ignore[union-attr]
            assert "bytes" in text and "context of 1024 tokens" in text and "shorten the prompt" in text
            assert took < 30  # not minutes of tokenizing (the wire itself carries 50 MB)
        assert server.memory_info().rss < 3e9  # not the 9-12 GB a tokenized 50 MB prompt took
        fine = await client.call_tool("generate", {"prompt": "def add", "max_tokens": 4})
        assert not fine.is_error, fine.content


async def test_a_hostfile_must_be_inside_the_roots_and_never_leaks_or_injects(
    tmp_path: Path, fake_model: Path, tiny_data: Path
) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('[{"ssh": 1, "token": "SECRET-CONTENT-42"}, {"ssh": 2}]')
    injecting = tmp_path / "hosts.json"
    injecting.write_text(
        '[{"ssh": "-oProxyCommand=touch /tmp/pwned", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["1"]}]'
    )
    outside = Path("/etc/hostname")
    async with Client(fake_stdio(tmp_path / "home", "succeed"), mode="legacy") as client:
        for hosts, expected in [
            (outside, "outside the server's allowed roots"),
            (secret, "entry 0.ssh"),
            (injecting, "entry 0.ssh: string_pattern_mismatch"),
        ]:
            refused = await client.call_tool(
                "start_qlora_run", {"config": config(fake_model, tiny_data, hosts=str(hosts))}
            )
            text = refused.content[0].text  # type: ignore[union-attr]
            assert refused.is_error and expected in text, text
            assert "SECRET-CONTENT" not in text and "ProxyCommand" not in text


def test_ssh_never_takes_a_host_name_as_an_option() -> None:
    from trainer.lifecycle.group import RANK_ENV, remote_command
    from trainer.planning.hostfile import Host

    command = remote_command(Host(ssh="mac-2", ips=["10.0.0.2"]), ["true"], {RANK_ENV: "1"}, None)
    assert command[command.index("mac-2") - 1] == "--"


async def test_concurrent_first_calls_on_a_fresh_server_all_answer(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    """The first calls race for the first imports of mlx-lm and transformers, and for one GGUF's import."""
    from mcp_local_demo.bundled import smollm2_gguf

    gguf = smollm2_gguf()
    params = fake_stdio(tmp_path / "home", "succeed")
    params.args += ["--root", str(gguf.parent)]
    async with Client(params, mode="legacy") as client:
        answers: dict[int, Any] = {}

        async def call(i: int, name: str, arguments: dict[str, Any]) -> None:
            answers[i] = await client.call_tool(name, arguments)

        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(call, i, "load_model", {"path": str(gguf)})
                tg.start_soon(call, 3, "validate_dataset", {"data": str(tiny_data), "model": str(tiny_model)})
                tg.start_soon(call, 4, "profile_memory", {"model": str(tiny_model)})
                tg.start_soon(call, 5, "load_model", {"path": str(tiny_model)})
    failed = {i: a.content[0].text for i, a in answers.items() if a.is_error}
    assert len(answers) == 6 and failed == {}, failed
    assert len({a.structured_content["model"] for i, a in answers.items() if i < 3}) == 1  # one import, shared


async def test_paths_and_files_symlinked_out_of_the_roots_are_refused(tmp_path: Path, tiny_model: Path) -> None:
    outside = Path("/etc")  # not under the test's roots (the temp folder and the home)
    linked_model = tmp_path / "linked-model"
    linked_model.mkdir()
    for item in tiny_model.iterdir():
        (linked_model / item.name).symlink_to(item)
    (linked_model / "config.json").unlink()
    (linked_model / "config.json").symlink_to(outside / "hostname")
    linked_data = tmp_path / "linked-data"
    linked_data.mkdir()
    (linked_data / "train.jsonl").symlink_to(outside / "passwd")
    async with Client(fake_stdio(tmp_path / "home", "succeed"), mode="legacy") as client:
        calls: list[tuple[str, dict[str, Any]]] = [
            ("profile_memory", {"model": str(outside)}),
            ("profile_memory", {"model": str(linked_model)}),
            ("load_model", {"path": str(linked_model)}),
            ("validate_dataset", {"data": str(linked_data)}),
            ("start_qlora_run", {"config": {"model": str(tiny_model), "data": str(linked_data), "num_layers": 4}}),
        ]
        for tool, arguments in calls:
            refused = await client.call_tool(tool, arguments)
            text = refused.content[0].text  # type: ignore[union-attr]
            assert refused.is_error and "outside the server's allowed roots" in text, (tool, text)
            assert "root:" not in text  # nothing of /etc/passwd


async def test_a_start_whose_request_the_client_cancels_queues_nothing(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    async with Client(fake_stdio(tmp_path / "home", "succeed"), mode="legacy") as client:
        await client.call_tool("list_runs", {})
        with anyio.move_on_after(0.3):  # during the checks (reading the data with the model's tokenizer)
            await client.call_tool("start_qlora_run", {"config": config(tiny_model, tiny_data, iters=10_000)})
        await anyio.sleep(3)
        assert (await client.call_tool("list_runs", {})).structured_content["runs"] == []  # type: ignore[index]


async def test_odd_paths_and_damaged_weights_get_named_errors(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    damaged = tmp_path / "damaged-model"
    damaged.mkdir()
    (damaged / "config.json").write_text((tiny_model / "config.json").read_text())
    (damaged / "model.safetensors").write_bytes(os.urandom(100_000))
    nul_data = str(tiny_data) + "\x00"
    async with Client(fake_stdio(tmp_path / "home", "succeed"), mode="legacy") as client:
        calls: list[tuple[str, dict[str, Any], str]] = [
            ("start_qlora_run", {"config": config(tiny_model, tiny_data, data=nul_data)}, "contains a NUL byte"),
            ("validate_dataset", {"data": nul_data}, "contains a NUL byte"),
            ("load_model", {"path": str(damaged)}, "damaged or not safetensors"),
            ("load_model", {"path": "x/.."}, "not an existing path, nor a Hugging Face repo id"),
            ("profile_memory", {"model": "x/.."}, "not an existing path, nor a Hugging Face repo id"),
        ]
        for tool, arguments, says in calls:
            refused = await client.call_tool(tool, arguments)
            text = refused.content[0].text  # type: ignore[union-attr]
            assert refused.is_error and says in text, (tool, text)


async def test_accepting_a_large_dataset_shows_progress_to_the_client(tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "large"
    data.mkdir()
    turn = {
        "messages": [{"role": "user", "content": "Write add_one. " * 20}, {"role": "assistant", "content": "x" * 800}]
    }
    (data / "train.jsonl").write_text((json.dumps(turn) + "\n") * 6000)
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with Client(fake_stdio(tmp_path / "home", "succeed"), mode="legacy") as client:
        started = await client.call_tool(
            "start_qlora_run",
            {"config": config(tiny_model, data, iters=1, max_seq_length=2048)},
            progress_callback=on_progress,
        )
    assert not started.is_error, started.content
    assert seen and all(total == 100 and message == "reading the dataset" for _, total, message in seen)
    assert [p for p, _, _ in seen] == sorted(p for p, _, _ in seen) and seen[-1][0] <= 100


async def test_the_default_roots_are_the_home_alone_not_the_working_directory(tmp_path: Path, tiny_model: Path) -> None:
    import subprocess

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_local", "--home", str(tmp_path / "home")],
        env={"PATH": os.environ.get("PATH", "")},
        cwd=str(tiny_model.parent),  # a host's working directory holding the model
    )
    async with Client(params, mode="legacy") as client:
        refused = await client.call_tool("load_model", {"path": str(tiny_model)})
    text = refused.content[0].text  # type: ignore[union-attr]
    assert refused.is_error and "outside the server's allowed roots" in text and "--root" in text
    config_run = subprocess.run(
        [sys.executable, "-m", "mcp_local", "config", "--host", "cursor"], capture_output=True, text=True, check=True
    )
    assert "no --root given: tools may use only files under the server's home" in config_run.stderr


async def test_over_stdio_a_step_longer_than_the_grace_is_saved_and_a_frozen_worker_still_killed(
    tmp_path: Path, fake_model: Path, tiny_data: Path
) -> None:
    """The server's 10 s grace: a 13 s step is waited for (the worker acknowledged the SIGTERM) and its state saved;
    a SIGSTOPped worker whose cancel request the client abandoned is killed all the same."""
    import signal

    import psutil

    server = fake_stdio(tmp_path / "home", "stepwise", FAKE_STEP_S="13")
    async with Client(server, mode="legacy") as client:
        run_id = await start(client, config(fake_model, tiny_data, iters=100))
        with anyio.fail_after(TIMEOUT):
            while (await client.call_tool("run_status", {"run_id": run_id})).structured_content["iteration"] < 1:  # type: ignore[index]
                await anyio.sleep(0.2)
        await anyio.sleep(1.0)  # a second into the first, unmeasured, 13 s step
        tic = time.monotonic()
        cancelled = await client.call_tool("cancel_run", {"run_id": run_id})
        assert time.monotonic() - tic > 10  # past the grace: waited for the step
        body = cancelled.structured_content
        assert body is not None and body["state"] == "cancelled"
        assert Path(body["adapter_path"], "adapters.safetensors").read_bytes() == b"step 1"

        frozen = await start(client, config(fake_model, tiny_data, iters=100))
        with anyio.fail_after(TIMEOUT):
            while (await client.call_tool("run_status", {"run_id": frozen})).structured_content["iteration"] < 1:  # type: ignore[index]
                await anyio.sleep(0.2)
        pid = next(w["pid"] for w in (await client.call_tool("profile_memory", {})).structured_content["workers"])  # type: ignore[index]
        os.kill(pid, signal.SIGSTOP)
        with anyio.move_on_after(0.5):  # the client gives up on its cancel_run
            await client.call_tool("cancel_run", {"run_id": frozen})
        status = await until_ended(client, frozen)
    assert status["state"] == "cancelled"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
