"""The server's command line (after __main__ has re-executed with the preloads): arguments, logging, then the MCP
server over stdio (or Streamable HTTP with --http). Only the protocol goes to stdout."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import anyio

from trainer import HOME_ENV, use_mlx_env

from .server import build_server, serve_stdio
from .state import MAX_CONCURRENT_ENV, MEMORY_BUDGET_ENV, SAMPLE_INTERVAL_ENV, TOKEN_ENV, ServerSettings

#: `config` is handled before this parser (__main__.py): --help says so
CONFIG_EPILOG = (
    "mcp-local config --host HOST [--root FOLDER ...] prints the snippet that adds this server to an MCP host "
    "(claude-desktop, claude-code, vscode, cursor, ...): see `mcp-local config --help`."
)


def main(argv: list[str] | None = None) -> None:
    defaults = ServerSettings.from_env()
    parser = argparse.ArgumentParser(prog="mcp-local", description=__doc__, epilog=CONFIG_EPILOG)
    parser.add_argument(
        "--home",
        type=Path,
        default=defaults.home,
        help=f"runs folder and SQLite database (env {HOME_ENV}; default %(default)s)",
    )
    parser.add_argument(
        "--sample-interval",
        type=float,
        default=defaults.sample_interval,
        help=f"default seconds between memory samples of a run (env {SAMPLE_INTERVAL_ENV}; default %(default)s)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=defaults.max_concurrent,
        help=f"runs trained at the same time (env {MAX_CONCURRENT_ENV}; default %(default)s)",
    )
    parser.add_argument(
        "--memory-budget-gb",
        type=float,
        default=defaults.memory_budget_gb,
        help=f"default memory budget of a run (env {MEMORY_BUDGET_ENV}; default: min(16 GB, 75%% of RAM))",
    )
    parser.add_argument(
        "--root",
        type=Path,
        action="append",
        default=None,
        help="a folder whose models, data and adapters tools may use, besides the home (repeatable; default: the home "
        "only; a host's working directory is never allowed on its own)",
    )
    parser.add_argument(
        "--max-queued", type=int, default=defaults.max_queued, help="runs waiting at once (default %(default)s)"
    )
    parser.add_argument(
        "--max-dataset-mb", type=float, default=defaults.max_dataset_mb, help="largest dataset a run may use (MB)"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    http = parser.add_argument_group("Streamable HTTP (remote and shared use)")
    http.add_argument("--http", action="store_true", help="serve over HTTP at http://HOST:PORT/mcp instead of stdio")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    http.add_argument("--port", type=int, default=8765, help="port (default %(default)s)")
    http.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"the bearer token clients must send (env {TOKEN_ENV}; default: a new one, written to stderr)",
    )
    http.add_argument(
        "--allowed-host", action="append", default=[], help="another Host name clients may use (repeatable)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    home = args.home.expanduser().resolve()
    roots = tuple(root.expanduser().resolve() for root in args.root or [])
    settings = ServerSettings(
        home=home,
        roots=roots,
        max_queued=args.max_queued,
        max_dataset_mb=args.max_dataset_mb,
        sample_interval=args.sample_interval,
        max_concurrent=args.max_concurrent,
        memory_budget_gb=args.memory_budget_gb,
    )
    use_mlx_env(settings.home)  # generation runs in this process too
    if args.http:  # uvicorn and starlette only for HTTP: a stdio start does without them
        from .http import HttpSettings, serve_http, token_or_new

        token = token_or_new(args.token)
        http_settings = HttpSettings(args.host, args.port, token, tuple(args.allowed_host))
        anyio.run(serve_http, build_server(settings), http_settings)
    else:
        anyio.run(serve_stdio, build_server(settings))
