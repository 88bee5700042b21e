"""`mcp-local` / `python -m mcp_local`: the MCP server (cli.py); `mcp-local config --host X` prints a host's snippet
(host_config.py).

Generation runs in the server's process, so MLX needs OpenBLAS and tcmalloc preloaded: the process re-executes itself
with them first thing, before the SDK and the rest are imported (importing them twice cost a cold start 0.7 s).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["config"]:  # prints a host's snippet: no server, no preloads
        from .host_config import main as print_config

        print_config(args[1:])
        return
    from trainer import reexec_with_preloads  # the package is lazy: this imports preload.py alone

    reexec_with_preloads()
    from .cli import main as serve

    serve(argv)


if __name__ == "__main__":
    main()
