"""What mcp_local/sdk_private.py relies on in the installed MCP SDK, pinned: an upgrade that moves it fails here."""

from __future__ import annotations

import inspect
from importlib.metadata import version
from pathlib import Path

from mcp.server.connection import Connection
from mcp.server.lowlevel.server import Server
from mcp.server.session import ServerSession

from mcp_local import ServerSettings, build_server
from mcp_local.sdk_private import lowlevel_server


def test_the_low_level_server_is_where_we_register_and_run(tmp_path: Path) -> None:
    low = lowlevel_server(build_server(ServerSettings(home=tmp_path)))
    assert isinstance(low, Server)
    assert list(inspect.signature(low.add_request_handler).parameters)[:3] == ["method", "params_type", "handler"]
    assert "notification_options" in inspect.signature(low.create_initialization_options).parameters
    assert list(inspect.signature(low.run).parameters)[:3] == ["read_stream", "write_stream", "initialization_options"]


def test_a_session_keeps_its_connection_with_state_and_an_exit_stack() -> None:
    assert "self._connection = connection" in inspect.getsource(ServerSession.__init__)
    hints = inspect.get_annotations(Connection, eval_str=False)
    assert "state" in hints and "exit_stack" in hints


def test_the_mcp_pin_covers_the_version_these_tests_checked() -> None:
    major, minor = (int(part) for part in version("mcp").split(".")[:2])
    assert (major, minor) == (2, 3), "sdk_private.py was checked against mcp 2.3: check it again, then widen the pin"
