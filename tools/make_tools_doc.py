"""Regenerate the tables of docs/mcp/tools.md from the server's own tools/list (descriptions, arguments, result
fields, QLoRAConfig), keeping the page's prose: its introduction and any paragraph after a tool's result fields.

uv run python tools/make_tools_doc.py
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

from mcp import Client
from mcp_local import ServerSettings, build_server
from trainer import QLoRAConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "mcp" / "tools.md"


def _type(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " or ".join(_type(option) for option in schema["anyOf"])
    kind = schema.get("type", "object")
    names = kind if isinstance(kind, list) else [kind]
    if "enum" in schema:
        values = [f"`{v}`" for v in schema["enum"] if v is not None]
        names = [" / ".join(values)] + (["null"] if None in schema["enum"] else [])
    return " or ".join(names)


def _default(schema: dict[str, Any], required: bool) -> str:
    return "required" if required else json.dumps(schema.get("default"))


def _section(tool: Any, prose: str) -> str:
    hints = tool.annotations
    open_world = hints.open_world_hint is not False  # left out: the spec's default, open world
    lines = [f"## {tool.name}", "", tool.description or "", ""]
    lines.append(
        f"Annotations: read-only {bool(hints.read_only_hint)}, destructive {bool(hints.destructive_hint)}, "
        f"idempotent {bool(hints.idempotent_hint)}, open-world {open_world}"
        + (" (a hub repo id is downloaded if not cached)." if open_world else ".")
    )
    lines += ["", "| argument | type | default | description |", "|---|---|---|---|"]
    required = set(tool.input_schema.get("required", []))
    for name, prop in tool.input_schema.get("properties", {}).items():
        kind = "QLoRAConfig" if name == "config" and tool.name == "start_qlora_run" else _type(prop)
        description = prop.get("description", "")
        lines.append(f"| `{name}` | {kind} | {_default(prop, name in required)} | {description} |")
    fields = ", ".join(f"`{f}`" for f in (tool.output_schema or {}).get("properties", {}))
    lines += ["", f"Result fields: {fields}.", ""]
    return "\n".join(lines) + "\n" + prose


def _config_table() -> str:
    schema = QLoRAConfig.model_json_schema()
    required = set(schema.get("required", []))
    rows = ["| field | default | description |", "|---|---|---|"]
    for name, prop in schema["properties"].items():
        rows.append(f"| `{name}` | {_default(prop, name in required)} | {prop.get('description', '')} |")
    return "\n".join(rows) + "\n"


async def render(text: str) -> str:
    async with Client(build_server(ServerSettings(home=Path(tempfile.mkdtemp()))), mode="legacy") as client:
        tools = (await client.list_tools()).tools
    head, _, rest = text.partition("\n## ")
    body, _, config_part = ("## " + rest).partition("### QLoRAConfig")
    old = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", body, flags=re.M | re.S))
    sections = []
    for tool in tools:
        prose = old.get(tool.name, "").partition("Result fields:")[2].partition("\n")[2]
        sections.append(_section(tool, prose.strip("\n") + "\n\n" if prose.strip() else ""))
    config_intro = config_part.split("\n|", 1)[0]
    return head + "\n" + "".join(sections) + "### QLoRAConfig" + config_intro + "\n" + _config_table()


def main() -> None:
    DOC.write_text(anyio.run(render, DOC.read_text(encoding="utf-8")), encoding="utf-8")
    sys.stderr.write(f"wrote {DOC}\n")


if __name__ == "__main__":
    main()
