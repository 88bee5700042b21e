"""Installing like the reference servers: a missing MLX backend is a clear error naming the install command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mcp import Client
from tests.mcp.conftest import fake_server


async def test_a_missing_mlx_backend_names_the_install_command(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # `import mlx.core` fails, as with no libmlx.so
    async with Client(fake_server(tmp_path, roots=(tiny_model.parent,)), mode="legacy") as client:
        result = await client.call_tool("load_model", {"path": str(tiny_model)})
    assert result.is_error
    text = result.content[0].text  # type: ignore[union-attr]
    assert "MLX is installed without a backend" in text and "pip install 'mcp-local[cpu]'" in text
    assert "Traceback" not in text
