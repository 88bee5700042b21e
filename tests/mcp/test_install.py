"""Installing like the reference servers: the wheel in a fresh venv with pip, and a missing MLX backend as a clear
error naming the install command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
async def test_the_wheel_installs_with_pip_into_a_fresh_venv_and_serves(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    """What a user of PyPI gets: the wheel, `pip install 'mcp-local[cpu]'` into a new venv (from the registry), and its
    `mcp-local` command driven over stdio by the SDK's client."""
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
