"""Paths a tool may name: inside the server's roots once resolved, real files or folders, adapters never overwritten."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from mcp import Client
from tests.mcp.conftest import fake_server
from tests.trainer.helpers import config


@pytest.fixture
def allowed(tmp_path: Path, fake_model: Path, tiny_data: Path) -> dict[str, Path]:
    root = tmp_path / "allowed"
    root.mkdir()
    model, data = root / "model", root / "data"
    shutil.copytree(fake_model, model)
    shutil.copytree(tiny_data, data)
    outside = tmp_path / "outside"
    shutil.copytree(fake_model, outside)
    (root / "link-out").symlink_to(outside)
    return {"root": root, "model": model, "data": data, "outside": outside, "home": tmp_path / "home"}


ESCAPES = [
    ("outside", {"model": "OUTSIDE"}, "outside the server's allowed roots"),
    ("dot-dot", {"model": "ROOT/../outside"}, "outside the server's allowed roots"),
    ("symlink out", {"model": "ROOT/link-out"}, "outside the server's allowed roots"),
    ("device", {"data": "/dev/null"}, "is not a file or folder"),
    ("adapter_dir outside", {"adapter_dir": "OUTSIDE/adapters"}, "outside the server's allowed roots"),
]


@pytest.mark.parametrize(("name", "overrides", "expected"), ESCAPES, ids=[e[0] for e in ESCAPES])
async def test_a_path_outside_the_roots_is_refused_before_anything_is_written(
    allowed: dict[str, Path], name: str, overrides: dict[str, Any], expected: str
) -> None:
    def fill(value: str) -> str:
        return value.replace("OUTSIDE", str(allowed["outside"])).replace("ROOT", str(allowed["root"]))

    run = {**config(allowed["model"], allowed["data"]), **{k: fill(v) for k, v in overrides.items()}}
    async with Client(fake_server(allowed["home"], roots=(allowed["root"],)), mode="legacy") as client:
        result = await client.call_tool("start_qlora_run", {"config": run})
        assert result.is_error and expected in result.content[0].text, result.content[0].text
        if "model" in overrides:
            loaded = await client.call_tool("load_model", {"path": run["model"]})
            assert loaded.is_error and expected in loaded.content[0].text
        assert (await client.call_tool("list_runs", {})).structured_content["runs"] == []
    assert not any((allowed["home"] / "runs").iterdir())


async def test_an_adapter_dir_never_overwrites_another_runs_adapter(allowed: dict[str, Path]) -> None:
    async with Client(fake_server(allowed["home"], roots=(allowed["root"],)), mode="legacy") as client:
        base = config(allowed["model"], allowed["data"])
        first = await client.call_tool("start_qlora_run", {"config": base})
        run_dir = Path(first.structured_content["run_dir"])
        shared = str(allowed["root"] / "shared-adapter")
        refusals = [
            ({**base, "adapter_dir": str(run_dir / "adapters")}, "inside a run's folder"),
            ({**base, "adapter_dir": str(allowed["home"] / "runs" / "elsewhere")}, "inside a run's folder"),
        ]
        second = await client.call_tool("start_qlora_run", {"config": {**base, "adapter_dir": shared}})
        assert not second.is_error, second.content[0].text
        refusals.append(({**base, "adapter_dir": shared}, "adapter folder of a live run"))
        for run, expected in refusals:
            result = await client.call_tool("start_qlora_run", {"config": run})
            assert result.is_error and expected in result.content[0].text, result.content[0].text
        status = await client.call_tool(
            "run_status", {"run_id": second.structured_content["run_id"], "wait_seconds": 30}
        )
        while status.structured_content["state"] not in ("succeeded", "failed"):
            status = await client.call_tool(
                "run_status", {"run_id": second.structured_content["run_id"], "wait_seconds": 30}
            )
        after = await client.call_tool("start_qlora_run", {"config": {**base, "adapter_dir": shared}})
        assert after.is_error and "already holds an adapter" in after.content[0].text


async def test_a_read_only_home_still_answers_and_the_run_tools_say_why(tmp_path: Path, tiny_model: Path) -> None:
    """A home on a read-only filesystem (bind-mounted read-only in a private mount namespace): the server answers
    initialize, the model tools work, and every run tool is an error naming the home and --home."""
    import os
    import sys

    import anyio

    from mcp import StdioServerParameters
    from tests.conftest import REPO, user_namespaces

    if not user_namespaces():
        pytest.skip("user namespaces are not available here, so no read-only mount can be made")
    home = tmp_path / "home"
    home.mkdir()
    mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$1" -m mcp_local --home "$0" --root "$2"'
    params = StdioServerParameters(
        command="unshare",
        args=["-Urm", "sh", "-c", mount, str(home), sys.executable, str(tmp_path.parent.parent)],
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO / "src")},
    )
    with anyio.fail_after(60):
        async with Client(params, mode="legacy") as client:
            tools = (await client.list_tools()).tools
            assert {"start_qlora_run", "list_runs"} <= {t.name for t in tools}
            for name, arguments in (("list_runs", {}), ("run_status", {"run_id": "x"})):
                result = await client.call_tool(name, arguments)
                text = result.content[0].text  # type: ignore[union-attr]
                assert result.is_error and f"home {home} cannot hold runs" in text and "--home" in text, text
            loaded = await client.call_tool("load_model", {"path": str(tiny_model)})
            assert not loaded.is_error, loaded.content
