"""Build the MCP Bundle (`dist/mcp-local-VERSION.mcpb`): a `uv`-type bundle (manifest 0.4) holding the project's
pyproject.toml, uv.lock and sources; the host installs Python and the locked dependencies with uv on first start.
Metal on macOS; the CPU backend on Linux (a platform override adds the `cpu` group). Packed and validated with the
official `mcpb` CLI (package.json's dev tools: `npm ci`).

uv run python tools/build_mcpb.py [--out dist]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("pyproject.toml", "uv.lock", "README.md", "LICENSE", "src")
ENTRY_POINT = "src/mcp_local/__main__.py"
#: the host's command: the locked environment, without the dev, demo-model and test groups
UV_ARGS = ["run", "--frozen", "--directory", "${__dirname}", "--no-default-groups"]
SERVER_ARGS = ["mcp-local", "--root", "${user_config.data_folder}"]


def manifest(project: dict[str, Any], tools: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "manifest_version": "0.4",
        "name": project["name"],
        "display_name": "MCP Local (fine-tune and run local code LLMs)",
        "version": project["version"],
        "description": project["description"],
        "author": {"name": "mcp-local contributors"},
        "license": "MIT",
        "repository": {"type": "git", "url": "https://github.com/mcp-local/mcp-local"},
        "keywords": ["mlx", "qlora", "fine-tuning", "llm", "local"],
        "server": {
            "type": "uv",
            "entry_point": ENTRY_POINT,
            "mcp_config": {
                "command": "uv",
                "args": [*UV_ARGS, *SERVER_ARGS],
                "env": {"MCP_LOCAL_HOME": "${user_config.home}"},
                "platform_overrides": {"linux": {"args": [*UV_ARGS, "--group", "cpu", *SERVER_ARGS]}},
            },
        },
        "tools": tools,
        "user_config": {
            "home": {
                "type": "directory",
                "title": "Home folder",
                "description": "Runs, adapters and the run database",
                "default": "${HOME}/.mcp-local",
                "required": False,
            },
            "data_folder": {
                "type": "directory",
                "title": "Models and datasets",
                "description": "The folder whose models and datasets the tools may read",
                "default": "${HOME}",
                "required": False,
            },
        },
        "compatibility": {"platforms": ["darwin", "linux"], "runtimes": {"python": project["requires-python"]}},
    }


def tool_list() -> list[dict[str, str]]:
    """Names and first sentences from the server's own tools/list."""
    import anyio

    from mcp import Client
    from mcp_local import ServerSettings, build_server

    async def listed() -> list[dict[str, str]]:
        with tempfile.TemporaryDirectory() as home:
            async with Client(build_server(ServerSettings(home=Path(home))), mode="legacy") as client:
                tools = (await client.list_tools()).tools
        return [{"name": t.name, "description": (t.description or "").split(". ")[0].rstrip(".")} for t in tools]

    return anyio.run(listed)


def build(out_dir: Path) -> Path:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = out_dir.resolve() / f"{project['name']}-{project['version']}.mcpb"
    with tempfile.TemporaryDirectory() as staging:
        stage = Path(staging)
        for name in SHIPPED:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, stage / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
            else:
                shutil.copy2(source, stage / name)
        (stage / "manifest.json").write_text(json.dumps(manifest(project, tool_list()), indent=2), encoding="utf-8")
        mcpb = ROOT / "node_modules" / ".bin" / "mcpb"
        if not mcpb.is_file():
            raise SystemExit(f"{mcpb} is missing: run `npm ci` in {ROOT} (the official mcpb CLI packs the bundle)")
        subprocess.run([str(mcpb), "validate", str(stage / "manifest.json")], check=True, stdout=sys.stderr)
        subprocess.run([str(mcpb), "pack", str(stage), str(bundle)], check=True, stdout=sys.stderr)
    return bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    sys.stdout.write(f"{build(parser.parse_args().out)}\n")


if __name__ == "__main__":
    main()
