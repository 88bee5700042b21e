"""What every tool shares: the server state from the request context, error mapping and honest annotations."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import anyio
import anyio.from_thread
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

from trainer import TrainerError

from .sdk_private import connection_of
from .state import AppState

MAX_WAIT_S = 60.0  # some hosts background a call after 120 s
AppContext = Context[AppState, Any]


def local_hints(
    *, read_only: bool = False, destructive: bool = False, idempotent: bool = False, downloads: bool = False
) -> ToolAnnotations:
    """Honest hints. A tool that takes a hub repo id may download it (open world, the spec's default); the others
    act on this machine only. Hints equal to the spec's defaults (not read-only, not idempotent, open world) are left
    out; destructive is said either way, since its default is true. The spec reads destructive and idempotent only
    when a tool is not read-only."""
    return ToolAnnotations(
        read_only_hint=True if read_only else None,
        destructive_hint=None if read_only else destructive,
        idempotent_hint=True if idempotent and not read_only else None,
        open_world_hint=None if downloads else False,
    )


@contextmanager
def trainer_errors() -> Iterator[None]:
    """Our own errors are the caller's to fix: pass their message on as a tool error."""
    try:
        yield
    except TrainerError as exc:
        raise ToolError(str(exc)) from None


def app_state(ctx: AppContext) -> AppState:
    state = ctx.request_context.lifespan_context
    session = ctx.request_context.session
    state.legacy_sessions.setdefault(connection_of(session), session)
    return state


def progress_from_thread(ctx: AppContext, message: str, every_s: float = 1.0) -> Callable[[float], None]:
    """A progress callback for work in a thread (fraction done): a notification to the client at most every `every_s`
    seconds, sent on the event loop."""
    last = 0.0

    def report(fraction: float) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < every_s:
            return
        last = now
        with suppress(Exception):  # a client gone or a loop closing: progress is a courtesy, the work goes on
            anyio.from_thread.run(ctx.report_progress, round(fraction * 100, 1), 100.0, message)

    return report
