"""docs/mcp/ matches what the server really offers."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mcp import Client
from tests.conftest import REPO
from tests.mcp.conftest import fake_server

DOCS = REPO / "docs" / "mcp"


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (\w+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


async def test_tools_reference_matches_tools_list(tmp_path: Path) -> None:
    async with Client(fake_server(tmp_path), mode="legacy") as client:
        tools = (await client.list_tools()).tools
    tools_part, _, qlora = (DOCS / "tools.md").read_text(encoding="utf-8").partition("### QLoRAConfig")
    sections = _sections(tools_part)
    assert set(sections) == {t.name for t in tools}
    for tool in tools:
        documented = set(re.findall(r"^\| `(\w+)` \|", sections[tool.name], flags=re.M))
        assert documented == set(tool.input_schema.get("properties", {})), tool.name
        assert tool.description and tool.description in sections[tool.name]
    config_fields = set(
        tools[[t.name for t in tools].index("start_qlora_run")].input_schema["properties"]["config"]["properties"]
    )
    assert set(re.findall(r"^\| `(\w+)` \|", qlora, flags=re.M)) == config_fields


async def test_resources_reference_matches_resource_templates(tmp_path: Path) -> None:
    async with Client(fake_server(tmp_path), mode="legacy") as client:
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
    documented = set(re.findall(r"`(runs://\{run_id\}/\w+)`", (DOCS / "resources.md").read_text(encoding="utf-8")))
    assert documented == templates


def test_host_config_snippets_are_valid_json() -> None:
    blocks = re.findall(r"```json\n(.*?)```", (DOCS / "hosts.md").read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 3  # Claude Desktop, VS Code, Cursor
    for block in blocks:
        json.loads(block)


def test_the_readme_install_badges_carry_the_hosts_config() -> None:
    import base64
    from urllib.parse import parse_qs, urlparse

    from mcp_local.host_config import install_links

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = install_links()
    assert links["vscode"] in readme and links["cursor"] in readme
    vscode = json.loads(parse_qs(urlparse(links["vscode"]).query)["config"][0])
    cursor = json.loads(base64.b64decode(parse_qs(urlparse(links["cursor"]).query)["config"][0]))
    for server in (vscode, cursor):
        assert server["command"] == "uvx" and server["args"] == ["--from", "mcp-local[cpu]", "mcp-local"]


SNAPSHOT = Path(__file__).parent / "tools_list.snapshot.json"


async def test_tools_list_matches_its_snapshot(tmp_path: Path) -> None:
    """Names, titles, descriptions, annotations and schemas as clients see them: a change to any of them is a change
    to every assistant's context, made on purpose (UPDATE_SNAPSHOT=1 pytest tests/mcp/test_docs.py rewrites it)."""
    import os

    async with Client(fake_server(tmp_path), mode="legacy") as client:
        tools = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in (await client.list_tools()).tools]
    current = json.dumps(tools, indent=1, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_SNAPSHOT"):
        SNAPSHOT.write_text(current, encoding="utf-8")
    assert all(t.get("title") for t in tools)  # every tool has a display title
    undescribed = [
        f"{t['name']}.{name}"
        for t in tools
        for name, schema in t["inputSchema"].get("properties", {}).items()
        if not schema.get("description")
    ]
    assert not undescribed, undescribed  # every parameter says what it is
    assert SNAPSHOT.read_text(encoding="utf-8") == current, "tools/list changed: UPDATE_SNAPSHOT=1 to accept it"
