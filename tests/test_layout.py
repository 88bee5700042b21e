"""The layout's rules, checked: which layer may import which, where MLX may be imported, module and function sizes.

The layers of `trainer` (docs/architecture.md), lowest first; a layer imports only from itself and the ones listed:

    base         trainer.errors, trainer.settings, trainer.first_import, trainer.entrypoints
    environment  base                                      (no MLX: sets up and starts the processes MLX runs in)
    planning     base, environment                         (no MLX: config, model and data checks, memory)
    lifecycle    base, environment, planning               (no MLX: jobs, events, store, runner, worker)
    results      base, environment, planning, lifecycle    (no MLX: fuse, export, evaluate; starts engine modules as
                                                           child processes; the sandbox)
    engine       base, ..., lifecycle, results             (everything that imports MLX)
    trainer      everything (the package's __init__ and __main__: the public API and the CLI)

`mcp_local` and `mcp_local_demo` use only the names `trainer` exports (`from trainer import ...`).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.trainer.helpers import fake_env

SRC = REPO / "src"
ALLOWED = {
    "base": {"base"},
    "environment": {"base", "environment"},
    "planning": {"base", "environment", "planning"},
    "lifecycle": {"base", "environment", "planning", "lifecycle"},
    "engine": {"base", "environment", "planning", "lifecycle", "results", "engine"},
    "results": {"base", "environment", "planning", "lifecycle", "results"},
}
NO_MLX = {"base", "environment", "planning", "lifecycle", "results"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 200


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "trainer":
        return None
    if len(parts) == 1 or parts[1] in ("__main__",):
        return "trainer"
    if parts[1] in ("errors", "settings", "first_import", "entrypoints"):
        return "base"
    return parts[1]


def _imports(path: Path) -> list[str]:
    """Every module a file imports, anywhere in it (lazy imports included), relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(target)
            found += [f"{target}.{alias.name}" for alias in node.names]  # `from . import submodule`
    return found


def _sources(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


def test_each_trainer_layer_imports_only_the_layers_below_it() -> None:
    broken = []
    for path in _sources("trainer"):
        layer = _layer(_module_name(path))
        if layer == "trainer" or layer is None:
            continue
        for target in _imports(path):
            target_layer = _layer(target)
            if target_layer is not None and (target_layer == "trainer" or target_layer not in ALLOWED[layer]):
                broken.append(f"{path.relative_to(SRC)} ({layer}) imports {target} ({target_layer})")
    assert broken == []


def test_only_the_engine_imports_mlx() -> None:
    offenders = [
        f"{path.relative_to(SRC)} imports {target}"
        for path in _sources("trainer")
        if _layer(_module_name(path)) in NO_MLX
        for target in _imports(path)
        if target.split(".")[0] in ("mlx", "mlx_lm")
    ]
    assert offenders == []


def test_the_mcp_layer_uses_only_the_public_trainer_api() -> None:
    import trainer

    offenders = []
    for package in ("mcp_local", "mcp_local_demo"):
        for path in _sources(package):
            for target in _imports(path):
                if target.startswith("trainer.") and target.removeprefix("trainer.") not in trainer.__all__:
                    offenders.append(f"{path.relative_to(SRC)} imports {target}")
    assert offenders == []


def test_no_module_over_400_lines_no_class_over_200_and_no_function_over_80() -> None:
    too_long = [
        f"{path.relative_to(SRC)}: {n} lines"
        for path in sorted(SRC.rglob("*"))
        if path.suffix in (".cpp", ".h") and (n := path.read_text(encoding="utf-8").count("\n")) > MAX_MODULE_LINES
    ]
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(SRC)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(SRC)}: {node.name}() is {length} lines")
            elif isinstance(node, ast.ClassDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    too_long.append(f"{path.relative_to(SRC)}: class {node.name} is {length} lines")
    assert too_long == []


SERVER_WITHOUT_MLX = """
import json, sys
import anyio
from mcp import Client
from mcp_local import ServerSettings, build_server

home, model, data, env = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
config = {"model": model, "data": data, "num_layers": 4, "iters": 3, "batch_size": 2}

async def main():
    settings = ServerSettings(home=__import__("pathlib").Path(home), worker_env=env)
    async with Client(build_server(settings), raise_exceptions=True) as client:
        started = await client.call_tool("start_qlora_run", {"config": config})
        assert not started.is_error, started.content
        run_id = started.structured_content["run_id"]
        profile = await client.call_tool("profile_memory", {"config": config})
        assert not profile.is_error, profile.content
        status = await client.call_tool("run_status", {"run_id": run_id, "wait_seconds": 30})
        listed = await client.call_tool("list_runs", {})
        assert not status.is_error and not listed.is_error
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm"))
    sys.stdout.write(json.dumps({"predicted": started.structured_content["predicted_peak_gb"], "mlx": loaded}))

anyio.run(main)
"""


def test_planning_and_submitting_a_run_in_the_server_never_imports_mlx(
    tmp_path: Path, tiny_model: Path, tiny_data: Path
) -> None:
    """The server prepares, predicts, queues and follows runs without MLX: only workers and model sessions load it."""
    args = [str(tmp_path / "home"), str(tiny_model), str(tiny_data), json.dumps(fake_env("succeed"))]
    done = subprocess.run(
        [sys.executable, "-c", SERVER_WITHOUT_MLX, *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["predicted"] and result["predicted"] > 0  # the memory prediction ran, without MLX
    assert result["mlx"] == []


def test_every_module_started_by_name_is_listed_in_entrypoints_and_resolves() -> None:
    """A child process or a dotted-path import is an edge no import graph shows: each is named in
    trainer/entrypoints.py, resolves to a module of the package, and no other file spells a module's name."""
    import importlib.util

    from trainer import entrypoints

    for entry in entrypoints.ALL:
        module, _, attribute = entry.partition(":")
        assert importlib.util.find_spec(module) is not None, entry
        assert (SRC / (module.replace(".", "/") + ".py")).is_file(), entry
        if attribute:
            assert f"class {attribute}" in (SRC / (module.replace(".", "/") + ".py")).read_text(), entry
    spelled = [
        f"{path.relative_to(SRC)}: {node.value}"
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "entrypoints.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("trainer.")
    ]
    assert spelled == []


INTERNALS = (".__class__ =", "._p_1", "grad_checkpoint(", "._decode_kernel =", "._dense_weight =", "._float32")


def test_only_patches_py_touches_mlx_internals() -> None:
    """Class swaps, private attributes of MLX objects and mlx-lm's grad_checkpoint go through engine/patches.py."""
    found = []
    for path in sorted((SRC / "trainer").rglob("*.py")):
        if path.name == "patches.py":
            continue
        text = path.read_text(encoding="utf-8")
        for marker in INTERNALS:
            if marker in text:
                found.append(f"{path.relative_to(SRC)}: {marker}")
    assert found == []


def _is_python_command(node: ast.expr, assigned: dict[str, list[ast.expr]]) -> bool:
    """`python_module(...)`, `[sys.executable, ...]`, or a name assigned one of them in the same function."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "python_module":
        return True
    if isinstance(node, ast.List) and node.elts:
        first = node.elts[0]
        return isinstance(first, ast.Attribute) and first.attr == "executable"
    if isinstance(node, ast.Name):
        return any(_is_python_command(value, {}) for value in assigned.get(node.id, []))
    return False


def test_every_python_child_gets_the_mlx_environment() -> None:
    """Without the preloads a child's MLX runs the reference BLAS (a held-out loss at 14 tokens/s instead of 203):
    every subprocess started with this interpreter passes an `env` built by our environment functions."""
    missing = []
    for path in sorted((SRC / "trainer").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            assigned: dict[str, list[ast.expr]] = {}
            for node in ast.walk(function):
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                    assigned.setdefault(node.targets[0].id, []).append(node.value)
            for call in ast.walk(function):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr in ("run", "Popen")
                    and isinstance(call.func.value, ast.Name)
                    and call.func.value.id == "subprocess"
                    and call.args
                    and _is_python_command(call.args[0], assigned)
                    and not any(k.arg == "env" for k in call.keywords)
                ):
                    missing.append(f"{path.relative_to(SRC)}:{call.lineno}")
    assert not missing, f"python children started without env= (use mlx_child_environment): {missing}"


def test_a_child_gets_the_preloads_this_machine_has() -> None:
    from trainer.environment.isolated import run_isolated
    from trainer.environment.preload import LIBRARIES, find

    printed = run_isolated("trainer.environment.process_env", [], what="the probe", hint="")
    preloaded = next(line for line in printed.splitlines() if line.startswith("LD_PRELOAD=")).split("=", 1)[1]
    for lib in LIBRARIES:
        path = find(lib)
        assert path is None or str(path) in preloaded.split(":"), (lib.name, preloaded)
