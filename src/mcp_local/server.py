"""build_server(): the MCPServer with its tools, resources, subscriptions and a lifespan that owns the runner."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any, cast

import anyio
from mcp.server import MCPServer, NotificationOptions
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp.types import CallToolResult, InputRequiredResult
from mcp.types import Tool as MCPTool
from pydantic import ValidationError

from trainer import (
    HOME_ENV,
    JobRunner,
    ModelSession,
    RunStore,
    TrainerError,
    build_decode_kernel_in_background,
    describe_validation_error,
)

from .compact import compact_schema, shallow_schema
from .notify import bridge
from .plot import register_plot_template
from .prompts import register_prompts
from .resources import register_resource_templates, register_run_resources
from .sdk_private import lowlevel_server
from .state import AppState, ServerSettings
from .subscribe import register_legacy_subscriptions
from .tools import register_tools
from .wire import ScreenedLines, claim_stdin

log = logging.getLogger(__name__)
RECENT_RUNS_LISTED = 50
#: seconds a signalled server gives its lifespan to close before it exits regardless
SHUTDOWN_GRACE_S = 3.0
INSTRUCTIONS = """\
Fine-tune and run local code LLMs with MLX-LM (QLoRA). Three workflows, each also a prompt (prompts/list):
- Try a model (try_a_model): list_models shows what is here; load_model(path) then generate(prompt).
- Fine-tune and follow (fine_tune_and_follow): validate_dataset(data, model) checks every line;
  start_qlora_run(config) queues a run and returns its run_id at once; follow it with
  run_status(run_id, wait_seconds=60, until="end"), which answers at the end, on an error or a stall, or after 60 s,
  with loss, memory and ETA; cancel_run stops it (adapter saved), resume_run continues a stopped one, list_runs and
  delete_run manage them; generate(run_id=...) uses a finished run's adapter; export_model fuses it and writes GGUF.
  config.mode: sft imitates examples; dpo or orpo learn from {prompt, chosen, rejected} pairs; grpo from
  {prompt, tests}, rewarded by the tests its completions pass.
- From a repository to a better coder (tune_on_repository): build_dataset(source, out, format="instruct") ->
  start_qlora_run(config with data=out) -> evaluate(run_id), called again until it has ended: held-out perplexity and
  function completion, base vs adapter, each change with a 95% interval.
profile_memory shows the server's, the models' and every worker's memory and, for a config, its predicted peak; over
the budget it names the fastest plan that fits (fit_to_budget=true takes it). Resources runs://{run_id}/status, /memory
and /metrics update live (subscribe to them); /plot is a PNG."""


class LocalServer(MCPServer[AppState]):
    """MCPServer whose argument errors read as this project's own (field, value, what is allowed), as the CLI's do,
    and whose tool list is compact (compact.py)."""

    async def list_tools(self) -> list[MCPTool]:
        return [
            tool.model_copy(
                update={
                    "input_schema": compact_schema(tool.input_schema),
                    "output_schema": shallow_schema(tool.output_schema) if tool.output_schema else None,
                }
            )
            for tool in await super().list_tools()
        ]

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[AppState, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, TrainerError):  # raised outside a tool's own trainer_errors(): still the caller's
                raise ToolError(f"{name}: {cause}") from cause
            if isinstance(exc, UnexpectedToolError) or not isinstance(cause, ValidationError):
                raise
            raise ToolError(f"{name}: {describe_validation_error(cause, within='config')}") from cause


def build_server(settings: ServerSettings) -> MCPServer[AppState]:
    bus = InMemorySubscriptionBus()

    @asynccontextmanager
    async def lifespan(mcp: MCPServer[AppState]) -> AsyncIterator[AppState]:
        build_decode_kernel_in_background()  # once per machine; load_model never waits for the compiler
        models = ModelSession(models_root=settings.models_root(), roots=settings.allowed_roots())
        try:
            store = RunStore(settings.home)
        except (OSError, sqlite3.Error) as exc:  # still answer: the model tools work, the run tools say why not
            message = (
                f"the server's home {settings.home} cannot hold runs ({exc}); restart the server with --home (or "
                f"{HOME_ENV}) set to a writable folder"
            )
            log.error("%s", message)
            yield AppState(settings=settings, models=models, bus=bus, home_error=message)
            return
        try:
            async with (
                JobRunner(
                    store,
                    max_concurrent=settings.max_concurrent,
                    worker_env=settings.worker_env,
                    defaults=settings.run_defaults(),
                    detach=True,  # runs outlive this server: the next one on the home follows them
                ) as runner,
                anyio.create_task_group() as tg,
            ):
                state = AppState(settings=settings, models=models, bus=bus, job_runner=runner)
                for snap in runner.list_runs(limit=RECENT_RUNS_LISTED):
                    register_run_resources(mcp, state, snap.id)
                tg.start_soon(bridge, state, lambda run_id: register_run_resources(mcp, state, run_id))
                try:
                    yield state
                finally:
                    tg.cancel_scope.cancel()
        finally:
            store.close()

    mcp: MCPServer[AppState] = LocalServer(
        "mcp-local",
        version="0.1.0",
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        subscriptions=bus,
        warn_on_duplicate_resources=False,
    )
    register_tools(mcp)
    register_prompts(mcp)
    register_resource_templates(mcp)
    register_plot_template(mcp)
    register_legacy_subscriptions(mcp)
    return mcp


async def serve_stdio(mcp: MCPServer[Any]) -> None:
    """Like mcp.run() over stdio, but also advertising listChanged to 2025-era clients, and ending cleanly on SIGTERM
    or SIGINT (hosts send them to stop a server): the lifespan closes, and the workers keep training."""
    lowlevel = lowlevel_server(mcp)
    options = lowlevel.create_initialization_options(NotificationOptions(resources_changed=True))
    stopped_by: list[signal.Signals] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signals, tg.cancel_scope, stopped_by)
        lines = ScreenedLines(claim_stdin())
        async with stdio_server(stdin=cast(Any, lines)) as (read, write):
            lines.answer_through(write)
            await lowlevel.run(read, write, options)
            if stopped_by:  # the lifespan has closed: the thread blocked reading stdin would hold the exit
                _exit_now()
        tg.cancel_scope.cancel()
    # stdin closed and the lifespan closed, every change committed: end here, not through the interpreter's teardown,
    # where MLX's and OpenMP's threads met static destructors and aborted ("terminate called without an active
    # exception") in 2 of 25 shutdowns after a model was loaded
    _exit_now()


async def _stop_on_signals(scope: anyio.CancelScope, stopped_by: list[signal.Signals]) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for received in signals:
            log.info("%s: shutting down (runs keep training; the next server follows them)", received.name)
            stopped_by.append(received)
            scope.cancel()
            # every change is already committed to the store and workers are detached, so if the SDK's stdin reader
            # (a thread blocked on the host's pipe) holds the exit, ending the process loses nothing
            timer = threading.Timer(SHUTDOWN_GRACE_S, _exit_now)
            timer.daemon = True
            timer.start()
            return


def _exit_now() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(0)
