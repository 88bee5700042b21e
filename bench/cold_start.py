"""Cold start: seconds from spawning the server (`python -m mcp_local`, as a host does) to the answer of the first
tools/list over stdio, median of N starts, next to the SDK's smallest server started the same way; plus how many
times the process imported the MCP SDK (1: the re-exec with the preloads came before the heavy imports).

uv run python bench/cold_start.py [--starts 5] [--out results.jsonl]   (docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from memory_prediction import report

from mcp import Client, StdioServerParameters

#: the floor: the SDK's smallest server (one tool), started the same way
BARE_SDK_SERVER = """
from mcp.server import MCPServer
server = MCPServer("bare")

@server.tool()
def ping() -> str:
    return "pong"

server.run()
"""


async def first_tools_list(home: Path | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # as a host starts it: the server preloads
    ours = ["-m", "mcp_local", "--home", str(home), "--log-level", "WARNING"]
    args = ["-c", BARE_SDK_SERVER] if home is None else ours
    params = StdioServerParameters(command=sys.executable, args=args, env=env)
    start = time.perf_counter()
    async with Client(params, mode="legacy") as client:
        await client.list_tools()
        return time.perf_counter() - start


def sdk_imports(home: Path) -> int:
    """Run the server with -X importtime until its stdin closes; count the SDK's server package imports."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mcp_local", "--home", str(home), "--log-level", "WARNING"],
        input="", capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    return sum(1 for line in done.stderr.splitlines() if re.search(r"\|\s+mcp_local\.server$", line.rstrip()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="cold-start-"))
    anyio.run(first_tools_list, home)  # the first start on a new home creates its database: not counted
    times = [anyio.run(first_tools_list, home) for _ in range(args.starts)]
    bare = [anyio.run(first_tools_list, None) for _ in range(args.starts)]
    report(
        {
            "first_tools_list_s_median": round(statistics.median(times), 3),
            "first_tools_list_s": [round(t, 3) for t in times],
            "bare_sdk_server_s_median": round(statistics.median(bare), 3),
            "sdk_imports_per_start": sdk_imports(home),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
