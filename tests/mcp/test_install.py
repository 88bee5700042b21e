"""Installing like the reference servers: the wheel in a fresh venv with pip, and a missing MLX backend as a clear
error naming the install command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mcp import Client, StdioServerParameters
from tests.conftest import REPO
from tests.mcp.conftest import fake_server
from tests.mcp.test_tools_in_memory import TOOLS


async def test_a_missing_mlx_backend_names_the_install_command(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # `import mlx.core` fails, as with no libmlx.so
    async with Client(fake_server(tmp_path, roots=(tiny_model.parent,)), mode="legacy") as client:
        result = await client.call_tool("load_model", {"path": str(tiny_model)})
    assert result.is_error
    text = result.content[0].text  # type: ignore[union-attr]
    assert "MLX is installed without a backend" in text and "pip install 'mcp-local[cpu]'" in text
    assert "Traceback" not in text


@pytest.mark.slow
async def test_the_wheel_installs_with_pip_and_with_uvx_and_serves(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    """What a user of PyPI gets: the wheel, `pip install 'mcp-local[cpu]'` into a new venv (from the registry), and its
    `mcp-local` command driven over stdio by the SDK's client; then the same wheel started the way the printed host
    snippet starts it (`uvx --from 'mcp-local[cpu]' mcp-local`)."""
    wheels = tmp_path / "dist"
    subprocess.run(["uv", "build", "--wheel", "-q", "-o", str(wheels)], cwd=REPO, check=True, timeout=300)
    wheel = next(wheels.glob("mcp_local-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[cpu]"]
    subprocess.run(install, check=True, timeout=1200, capture_output=True)
    command = venv / "bin" / "mcp-local"
    assert command.is_file()
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VIRTUAL_ENV", "PYTHONPATH")}
    args = ["--home", str(tmp_path / "home"), "--root", str(tiny_model.parent), "--root", str(tiny_data)]
    params = StdioServerParameters(command=str(command), args=args, env=env, cwd=str(tmp_path))
    async with Client(params, mode="legacy") as client:
        assert {t.name for t in (await client.list_tools()).tools} == TOOLS
        loaded = await client.call_tool("load_model", {"path": str(tiny_model)})
        assert not loaded.is_error, loaded.content
        generated = await client.call_tool("generate", {"prompt": "def add(", "max_tokens": 4})
        assert not generated.is_error and generated.structured_content["generation_tokens"] > 0  # type: ignore[index]
        profile = await client.call_tool("profile_memory", {})
        assert profile.structured_content["server"]["pid"] > 0  # type: ignore[index]

    # the same wheel as the snippet `mcp-local config --host claude-desktop --package ...` prints, run as a host does
    home2 = str(tmp_path / "home2")
    snippet = _config(
        "--host", "claude-desktop", "--package", f"{wheel}[cpu]", "--home", home2, "--root", str(tiny_model.parent)
    )
    server = json.loads(snippet)["mcpServers"]["mcp-local"]
    assert server["args"][:3] == ["--from", f"{wheel}[cpu]", "mcp-local"]
    # uvx builds its environment on the first start: done once here, so the host's start below is a warm one
    subprocess.run([server["command"], *server["args"][:3], "config", "--host", "inspector"], env=env, check=True)
    params = StdioServerParameters(command=server["command"], args=server["args"], env=env, cwd=str(tmp_path))
    async with Client(params, mode="legacy") as client:
        loaded = await client.call_tool("load_model", {"path": str(tiny_model)})
        assert not loaded.is_error, loaded.content


def registry_command(entry: dict[str, Any], package_args: list[str]) -> list[str]:
    """The command VS Code's and the MCP Registry's installers build from a server.json pypi package: its runtime,
    the runtime arguments, `identifier==version`, then the package arguments."""
    (package,) = entry["packages"]
    command = [package["runtimeHint"]]
    for argument in package.get("runtimeArguments", []):
        command += [argument["name"], argument["value"]] if argument["type"] == "named" else [argument["value"]]
    return [*command, f"{package['identifier']}=={package['version']}", *package_args]


@pytest.mark.slow
async def test_the_registry_entry_starts_the_server_from_a_package_index(tmp_path: Path, tiny_model: Path) -> None:
    """server.json's command, as an installer builds it, against a local index standing in for PyPI (uv's
    find-links: the wheel built here; its dependencies from the usual index)."""
    wheels = tmp_path / "index"
    subprocess.run(["uv", "build", "--wheel", "-q", "-o", str(wheels)], cwd=REPO, check=True, timeout=300)
    entry = json.loads((REPO / "server.json").read_text(encoding="utf-8"))
    command = registry_command(entry, ["--home", str(tmp_path / "home"), "--root", str(tiny_model.parent)])
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VIRTUAL_ENV", "PYTHONPATH")}
    env["UV_FIND_LINKS"] = str(wheels)
    warm = subprocess.run([*command[: command.index("--home")], "--help"], env=env, capture_output=True, text=True)
    assert warm.returncode == 0, warm.stderr[-2000:]  # uvx builds its environment once, outside the host's timeout
    params = StdioServerParameters(command=command[0], args=command[1:], env=env, cwd=str(tmp_path))
    async with Client(params, mode="legacy") as client:
        assert {t.name for t in (await client.list_tools()).tools} == TOOLS
        loaded = await client.call_tool("load_model", {"path": str(tiny_model)})
        assert not loaded.is_error, loaded.content  # MLX's backend came with it


def _config(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mcp_local", "config", *args], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout


def test_config_prints_each_hosts_snippet_with_absolute_paths(tmp_path: Path) -> None:
    import shlex

    for host in ("claude-desktop", "cursor"):
        entry = json.loads(_config("--host", host, "--home", str(tmp_path)))["mcpServers"]["mcp-local"]
        assert Path(entry["command"]).is_absolute() and entry["command"].endswith("uvx")
        assert entry["args"] == ["--from", "mcp-local[cpu]", "mcp-local", "--home", str(tmp_path.resolve())]
    vscode = json.loads(_config("--host", "vscode", "--cuda"))["servers"]["mcpLocal"]
    assert vscode["type"] == "stdio" and vscode["args"] == ["--from", "mcp-local[cuda]", "mcp-local"]
    claude_code = shlex.split(_config("--host", "claude-code", "--source", str(REPO)))
    assert claude_code[:6] == ["claude", "mcp", "add", "--scope", "user", "mcp-local"]
    assert claude_code[7:] == [claude_code[7], "run", "--no-sync", "--directory", str(REPO), "mcp-local"]
    inspector = shlex.split(_config("--host", "inspector"))
    assert inspector[:2] == ["npx", "@modelcontextprotocol/inspector"] and inspector[-1] == "mcp-local"
    wrong = subprocess.run([sys.executable, "-m", "mcp_local", "config", "--host", "emacs"], capture_output=True)
    assert wrong.returncode == 2 and b"invalid choice: 'emacs'" in wrong.stderr


async def test_the_printed_source_snippet_starts_the_server(tmp_path: Path) -> None:
    """What a host runs from the Claude Desktop snippet of a clone: `uv run --no-sync --directory REPO mcp-local`."""
    entry = json.loads(_config("--host", "claude-desktop", "--source", str(REPO), "--home", str(tmp_path)))
    server = entry["mcpServers"]["mcp-local"]
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VIRTUAL_ENV")}
    params = StdioServerParameters(command=server["command"], args=server["args"], env=env, cwd="/")
    async with Client(params, mode="legacy") as client:
        assert {t.name for t in (await client.list_tools()).tools} == TOOLS
        runs = await client.call_tool("list_runs", {})
        assert not runs.is_error
    assert (tmp_path / "runs.sqlite3").is_file()
