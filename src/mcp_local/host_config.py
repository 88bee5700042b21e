"""`mcp-local config --host HOST`: print the snippet that connects a host to this server, with absolute paths.

Hosts start servers with a minimal PATH and their own working directory, so the snippet names `uvx` (or `uv`) by its
absolute path. It prints and never writes a host's files: the user sees what changes. The package spec carries the
backend: `mcp-local[cpu]` is Metal on macOS and the CPU on Linux; `mcp-local[cuda]` is NVIDIA. From a clone
(`--source`) the snippet runs the project's own environment without re-syncing it (`uv run --no-sync`), so a host
start never swaps a CUDA set-up back to the CPU backend.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

HOSTS = ("claude-desktop", "claude-code", "vscode", "cursor", "inspector")
SERVER_NAME = "mcp-local"


@dataclass(frozen=True)
class ServerCommand:
    command: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        return shlex.join([self.command, *self.args])


def _absolute(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise SystemExit(
            f"mcp-local config: {program!r} is not on PATH; install uv (https://docs.astral.sh/uv/, or "
            "`python3 -m pip install uv`) and run this again"
        )
    return str(Path(found).resolve())


def server_command(*, package: str, source: Path | None, home: Path | None, roots: list[Path]) -> ServerCommand:
    """How a host starts the server: `uvx --from PACKAGE mcp-local`, or `uv run --no-sync` in a clone."""
    if source is not None:
        args = ["run", "--no-sync", "--directory", str(source.resolve()), SERVER_NAME]
        command = _absolute("uv")
    else:
        args = [SERVER_NAME] if package == SERVER_NAME else ["--from", package, SERVER_NAME]
        command = _absolute("uvx")
    if home is not None:
        args += ["--home", str(home.expanduser().resolve())]
    for root in roots:
        args += ["--root", str(root.expanduser().resolve())]
    return ServerCommand(command, args)


def snippet(host: str, server: ServerCommand) -> str:
    """The text to paste (JSON for config files, a command line for CLIs)."""
    entry: dict[str, object] = {"command": server.command, "args": server.args}
    if server.env:
        entry["env"] = server.env
    if host in ("claude-desktop", "cursor"):
        return json.dumps({"mcpServers": {SERVER_NAME: entry}}, indent=2)
    if host == "vscode":
        return json.dumps({"servers": {"mcpLocal": {"type": "stdio", **entry}}}, indent=2)
    if host == "claude-code":
        return shlex.join(["claude", "mcp", "add", "--scope", "user", SERVER_NAME, "--", server.command, *server.args])
    if host == "inspector":
        return shlex.join(["npx", "@modelcontextprotocol/inspector", server.command, *server.args])
    raise ValueError(f"host {host!r} is not one of {', '.join(HOSTS)}")


WHERE = {
    "claude-desktop": "merge into claude_desktop_config.json (macOS: ~/Library/Application Support/Claude/), then "
    "quit and reopen Claude Desktop",
    "cursor": "merge into ~/.cursor/mcp.json (or .cursor/mcp.json in a project)",
    "vscode": "merge into .vscode/mcp.json (or the user mcp.json: 'MCP: Open User Configuration')",
    "claude-code": "run this once; `/mcp` in Claude Code shows it connected",
    "inspector": "run this to try every tool in the browser",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mcp-local config", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True, choices=HOSTS)
    backend = parser.add_mutually_exclusive_group()
    backend.add_argument("--cuda", action="store_true", help="NVIDIA GPUs: the mcp-local[cuda] package")
    backend.add_argument("--package", help="the package spec uvx installs (default mcp-local[cpu])")
    parser.add_argument("--source", type=Path, help="a clone of this project, set up with uv sync, to run instead")
    parser.add_argument("--home", type=Path, help="the server's home (runs, database; default ~/.mcp-local)")
    parser.add_argument("--root", type=Path, action="append", default=[], help="a folder tools may read (repeat)")
    args = parser.parse_args(argv)
    package = args.package or ("mcp-local[cuda]" if args.cuda else "mcp-local[cpu]")
    server = server_command(package=package, source=args.source, home=args.home, roots=args.root)
    sys.stderr.write(f"# {WHERE[args.host]}\n")
    if not args.root:
        sys.stderr.write(
            "# no --root given: tools may use only files under the server's home; rerun with --root FOLDER "
            "(repeatable) for the folders that hold your models, datasets and adapters\n"
        )
    sys.stdout.write(snippet(args.host, server) + "\n")


def install_links(package: str = f"{SERVER_NAME}[cpu]") -> dict[str, str]:
    """One-click install links for the README's badges (web links: GitHub renders no vscode:/cursor: links); the
    host resolves `uvx` on its own PATH here, as there is no machine to resolve it on."""
    import base64
    from urllib.parse import quote

    server = {"command": "uvx", "args": ["--from", package, SERVER_NAME]}
    vscode = json.dumps({"type": "stdio", **server}, separators=(",", ":"))
    cursor = base64.b64encode(json.dumps(server, separators=(",", ":")).encode()).decode()
    return {
        "vscode": f"https://vscode.dev/redirect/mcp/install?name={SERVER_NAME}&config={quote(vscode, safe='')}",
        "cursor": f"https://cursor.com/en/install-mcp?name={SERVER_NAME}&config={quote(cursor, safe='')}",
    }
