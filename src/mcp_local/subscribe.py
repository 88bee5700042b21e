"""2025-era `resources/subscribe` / `unsubscribe`, which MCPServer does not register itself (SDK 2.3)."""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer, ServerRequestContext
from mcp.types import EmptyResult, SubscribeRequestParams, UnsubscribeRequestParams

from .sdk_private import connection_of, lowlevel_server
from .state import AppState

_CLEANUP_KEY = "mcp_local.subscriptions_cleanup"


async def handle_subscribe(ctx: ServerRequestContext[AppState, Any], params: SubscribeRequestParams) -> EmptyResult:
    state = ctx.lifespan_context
    conn = connection_of(ctx.session)
    if not conn.state.get(_CLEANUP_KEY):
        conn.state[_CLEANUP_KEY] = True

        def forget() -> None:
            for subscribers in state.legacy_subscriptions.values():
                subscribers.pop(conn, None)
            state.legacy_sessions.pop(conn, None)

        conn.exit_stack.callback(forget)
    state.legacy_subscriptions[str(params.uri)][conn] = ctx.session
    state.legacy_sessions.setdefault(conn, ctx.session)
    return EmptyResult()


async def handle_unsubscribe(ctx: ServerRequestContext[AppState, Any], params: UnsubscribeRequestParams) -> EmptyResult:
    ctx.lifespan_context.legacy_subscriptions[str(params.uri)].pop(connection_of(ctx.session), None)
    return EmptyResult()


def register_legacy_subscriptions(mcp: MCPServer[Any]) -> None:
    lowlevel = lowlevel_server(mcp)
    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, handle_subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, handle_unsubscribe)
