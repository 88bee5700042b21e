"""The MCP Bundle and the registry entry: tools/build_mcpb.py packs a bundle the official mcpb CLI validates, and the
bundle, unpacked, starts the server the way its manifest tells a host to (uv installs the locked dependencies);
server.json names the package and version this project builds."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from mcp import Client, StdioServerParameters
from tests.conftest import REPO
from tests.mcp.test_tools_in_memory import TOOLS

MCPB = REPO / "node_modules" / ".bin" / "mcpb"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_server_json_names_this_package_and_version() -> None:
    entry = json.loads((REPO / "server.json").read_text(encoding="utf-8"))
    assert re.fullmatch(r"io\.github\.[a-zA-Z0-9-]+/[a-zA-Z0-9._-]+", entry["name"])
    assert 1 <= len(entry["description"]) <= 100  # the registry's limit
    assert entry["version"] == PROJECT["version"]
    (package,) = entry["packages"]
    assert package["registryType"] == "pypi" and package["identifier"] == PROJECT["name"]
    assert package["version"] == PROJECT["version"] and package["transport"] == {"type": "stdio"}
    # uvx's --with adds the Linux backend the `cpu` extra pins (not --from: installers append identifier==version,
    # which uvx then takes for the command, tests/mcp/test_install.py runs what they build)
    (runtime,) = package["runtimeArguments"]
    assert runtime["name"] == "--with" and runtime["value"] in PROJECT["optional-dependencies"]["cpu"]
    # the registry proves PyPI ownership by this marker in the package's long description (the README)
    assert f"<!-- mcp-name: {entry['name']} -->" in (REPO / "README.md").read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.skipif(
    not MCPB.exists() and not os.environ.get("CI"), reason="run `npm ci` for the mcpb CLI (scripts/test does)"
)
async def test_the_bundle_packs_and_its_manifest_command_serves(tmp_path: Path, tiny_model: Path) -> None:
    built = subprocess.run(
        [sys.executable, "tools/build_mcpb.py", "--out", str(tmp_path / "dist")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    bundle = Path(built.stdout.strip())
    assert bundle.name == f"mcp-local-{PROJECT['version']}.mcpb"
    unpacked = tmp_path / "bundle"
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(unpacked)
        names = set(archive.namelist())
    assert {"manifest.json", "pyproject.toml", "uv.lock", "src/mcp_local/__main__.py"} <= names
    assert not any("__pycache__" in name or name.startswith("tests/") for name in names)
    manifest = json.loads((unpacked / "manifest.json").read_text(encoding="utf-8"))
    assert {tool["name"] for tool in manifest["tools"]} == TOOLS
    config = manifest["server"]["mcp_config"]
    values = {"${__dirname}": str(unpacked), "${user_config.data_folder}": str(tiny_model.parent)}
    args = [values.get(arg, arg) for arg in config["platform_overrides"]["linux"]["args"]]
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VIRTUAL_ENV")}
    env |= {name: value.replace("${user_config.home}", str(home)) for name, value in config["env"].items()}
    uv = shutil.which(config["command"])
    assert uv is not None
    # the host's first start installs the environment; done here first so the client's start is a warm one
    subprocess.run([uv, *args[: args.index("mcp-local")], "python", "-c", "import mlx.core"], env=env, check=True)
    params = StdioServerParameters(command=uv, args=args, env=env, cwd=str(tmp_path))
    async with Client(params, mode="legacy") as client:
        assert {t.name for t in (await client.list_tools()).tools} == TOOLS
        loaded = await client.call_tool("load_model", {"path": str(tiny_model)})
        assert not loaded.is_error, loaded.content
    assert (home / "runs.sqlite3").is_file()


def test_the_package_metadata_is_complete() -> None:
    """What PyPI and the registries show: authors, keywords, classifiers (Python versions, OS), links."""
    assert PROJECT["authors"] and len(PROJECT["keywords"]) >= 5
    classifiers = set(PROJECT["classifiers"])
    assert {"Programming Language :: Python :: 3.11", "Operating System :: MacOS", "Typing :: Typed"} <= classifiers
    assert {"Homepage", "Repository", "Documentation", "Issues"} <= set(PROJECT["urls"])
    assert (REPO / "src" / "mcp_local" / "py.typed").is_file() and (REPO / "src" / "trainer" / "py.typed").is_file()
