"""The official MCP Inspector CLI, an independent client, calls every tool and reads every resource template (the
plot included) of a server that holds a real run."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, tiny_run_config
from tests.mcp.test_tools_in_memory import TOOLS

INSPECTOR = REPO / "node_modules" / ".bin" / "mcp-inspector"
pytestmark = [
    pytest.mark.skipif(
        not INSPECTOR.exists() and not os.environ.get("CI"),
        reason="run `npm ci` for the MCP Inspector (scripts/test does; CI requires it)",
    ),
    pytest.mark.slow,
]


def _inspect(home: Path, roots: list[Path], method: str, *extra: str) -> dict[str, Any]:
    assert shutil.which("node"), "the MCP Inspector needs Node.js"
    server = [sys.executable, "-m", "mcp_local", "--home", str(home), *(a for r in roots for a in ("--root", str(r)))]
    done = subprocess.run(
        [str(INSPECTOR), "--cli", *server, "--method", method, *extra],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout))


def _call(home: Path, roots: list[Path], tool: str, **arguments: Any) -> dict[str, Any]:
    # every value as JSON: the Inspector JSON-parses each one, so a bare run id of digits only (1 in 43) became a number
    args = [f"{key}={json.dumps(value)}" for key, value in arguments.items()]
    result = _inspect(home, roots, "tools/call", "--tool-name", tool, *(["--tool-arg", *args] if args else []))
    assert result["isError"] is False, result
    return dict(result["structuredContent"])


def test_the_inspector_calls_every_tool_and_reads_every_template(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "add.py").write_text('def add(a: int, b: int) -> int:\n    """Add."""\n    return a + b\n')
    home, roots = tmp_path / "home", [tiny_model.parent, tiny_data, tmp_path]
    config = tiny_run_config(tiny_model, tiny_data, iters=10, steps_per_report=5, steps_per_eval=10)
    (tmp_path / "run.json").write_text(json.dumps(config), encoding="utf-8")
    trained = subprocess.run(
        [sys.executable, "-m", "trainer", "--home", str(home), "run", str(tmp_path / "run.json")],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    run_id = json.loads(trained.stdout)["id"]

    listed = {t["name"] for t in _inspect(home, roots, "tools/list")["tools"]}
    assert listed == TOOLS
    templates = {t["uriTemplate"] for t in _inspect(home, roots, "resources/templates/list")["resourceTemplates"]}
    assert templates == {f"runs://{{run_id}}/{aspect}" for aspect in ("status", "memory", "metrics", "plot")}
    for aspect in ("status", "memory", "metrics"):
        content = _inspect(home, roots, "resources/read", "--uri", f"runs://{run_id}/{aspect}")["contents"][0]
        assert json.loads(content["text"])  # JSON, whole
    plot = _inspect(home, roots, "resources/read", "--uri", f"runs://{run_id}/plot")["contents"][0]
    assert plot["mimeType"] == "image/png" and base64.b64decode(plot["blob"]).startswith(b"\x89PNG")

    called = set()
    assert _call(home, roots, "load_model", path=str(tiny_model))["architecture"] == "qwen2"
    assert _call(home, roots, "generate", prompt="def add(", max_tokens=4, run_id=run_id)["generation_tokens"] > 0
    assert _call(home, roots, "profile_memory", config=config)["prediction"]["fits"] is True
    assert _call(home, roots, "run_status", run_id=run_id, include_config=True)["state"] == "succeeded"
    assert [r["id"] for r in _call(home, roots, "list_runs")["runs"]] == [run_id]
    assert _call(home, roots, "list_models")["loaded"] == []  # each Inspector call is a new server
    started = _call(home, roots, "start_qlora_run", config={**config, "iters": 100_000})
    assert _call(home, roots, "cancel_run", run_id=started["run_id"])["state"] == "cancelled"
    assert _call(home, roots, "resume_run", run_id=started["run_id"])["attempt"] == 2
    assert _call(home, roots, "cancel_run", run_id=started["run_id"])["state"] == "cancelled"
    assert _call(home, roots, "delete_run", run_id=started["run_id"])["run_id"] == started["run_id"]
    exported = _call(home, roots, "export_model", run_id=run_id, gguf="q8_0")
    assert exported["gguf"]["check"]["compared"] == 32 and Path(exported["fused"]["path"], "config.json").is_file()
    assert _call(home, roots, "validate_dataset", data=str(tiny_data), model=str(tiny_model))["errors"] == 0
    called |= {"load_model", "generate", "profile_memory", "run_status", "list_runs", "list_models", "export_model"}
    judged = _call(home, roots, "evaluate", run_id=run_id, humaneval_limit=1)
    assert judged["state"] == "succeeded" and [s["name"] for s in judged["evaluation"]["scores"]] == ["base", "adapter"]
    assert _call(home, roots, "run_status", run_id=run_id)["evaluation"].startswith("base: pass@1 0.000 (0/1)")
    called |= {"validate_dataset", "evaluate"}
    built = _call(home, roots, "build_dataset", source=str(repo), out=str(tmp_path / "built"), format="instruct")
    assert built["files_used"] == 1 and (tmp_path / "built" / "report.json").is_file()
    called.add("build_dataset")
    called |= {"start_qlora_run", "cancel_run", "resume_run", "delete_run"}
    assert called == TOOLS
