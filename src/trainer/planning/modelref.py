"""Turning what a user calls a model into a checked local MLX/Hugging Face model folder, without loading weights.

A model may be named by a local folder, a `.gguf` file (imported once into a cache folder) or a Hugging Face repo
id such as `Qwen/Qwen2.5-Coder-7B-Instruct` (downloaded where the hub is reachable, else taken from the local cache).
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from ..entrypoints import GGUF_IMPORT
from ..environment.isolated import run_isolated
from ..errors import ConfigError
from ..settings import default_home
from .paths import PathPolicy, reject_nul

#: bump when the GGUF importer's output changes, so earlier imports are redone
GGUF_IMPORT_VERSION = 1

log = logging.getLogger(__name__)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: what a model needs from a repo: no PyTorch weights, no GGUF copies
HUB_PATTERNS = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve_model_dir(ref: str, models_root: Path | None = None, policy: PathPolicy | None = None) -> Path:
    """Return the local model folder for `ref`, or raise a ConfigError that says what is wrong and how to fix it.

    GGUF imports are cached under `models_root` (default: the default home's models/); a local path must pass
    `policy` (the server's allowed roots), a hub repo id resolves into the hub's own cache."""
    reject_nul(ref, "model path")
    path = Path(ref).expanduser()
    if not path.exists() and REPO_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return _check_folder(resolve_hub_model(ref), ref)
    if path.exists() and policy is not None:
        path = policy.check_folder(path, "model path")
    if not path.exists():
        raise ConfigError(
            f"model path {ref!r} does not exist; pass a local model folder (with config.json), a .gguf file "
            "or a Hugging Face repo id such as Qwen/Qwen2.5-Coder-7B-Instruct"
        )
    if path.is_file() and path.suffix == ".gguf":
        return import_gguf_isolated(path.resolve(), models_root or default_home() / "models")
    return _check_folder(path, ref)


def resolve_hub_model(repo_id: str) -> Path:
    """The local snapshot of a hub repo: from the cache first, else downloaded (progress bars on stderr)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except HFValidationError as exc:
        raise ConfigError(
            f"model {repo_id!r} is not an existing path, nor a Hugging Face repo id ({exc}); pass a model folder, a "
            ".gguf file or a repo id such as Qwen/Qwen2.5-Coder-7B-Instruct"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline:
        raise ConfigError(
            f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; unset it to "
            "download, or pass a local folder or .gguf file"
        )
    log.info("downloading %s from the Hugging Face hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ConfigError(
            f"cannot get model {repo_id!r}: the Hugging Face hub is unreachable or refused ({type(exc).__name__}) and "
            "the model is not in the local cache; connect to the internet, or download it elsewhere and pass the "
            f"folder (if {repo_id!r} was meant as a local folder: it does not exist)"
        ) from None


#: written into an imported model's folder: where it came from
SOURCE_FILE = "source.json"


def gguf_cache_folder(gguf_path: Path, models_root: Path) -> Path:
    """Where a GGUF file's import lives: keyed by path, size, mtime and the importer's version."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{GGUF_IMPORT_VERSION}"
    return models_root / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def import_gguf_isolated(gguf_path: Path, models_root: Path) -> Path:
    """Import a GGUF once, in a subprocess: MLX's reader can crash on a malformed file, and the server must not."""
    folder = gguf_cache_folder(gguf_path, models_root)
    if (folder / "config.json").is_file():
        return folder
    models_root.mkdir(parents=True, exist_ok=True)
    # one import per file at a time, across threads and processes: the others wait for it and use its folder
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "config.json").is_file():
            return folder
        log.info("importing %s into %s", gguf_path, folder)
        run_isolated(
            GGUF_IMPORT,
            [str(gguf_path), str(folder)],
            what=f"importing {str(gguf_path)!r}",
            hint="the file is damaged or not a GGUF model: download it again, or pass a model folder",
        )
        if not (folder / "config.json").is_file():
            raise ConfigError(f"importing {str(gguf_path)!r} wrote no model folder; pass a model folder instead")
        (folder / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf_path)}), encoding="utf-8")  # for list_models
    return folder


def resolve_adapter_dir(adapter: str) -> Path:
    path = Path(adapter).expanduser()
    if path.is_file() and path.name == "adapters.safetensors":
        path = path.parent
    if not (path / "adapter_config.json").is_file() or not (path / "adapters.safetensors").is_file():
        raise ConfigError(
            f"adapter {adapter!r} is not an adapter folder (needs adapter_config.json and adapters.safetensors); "
            "pass a run's adapter_path"
        )
    return path.resolve()


def _check_folder(path: Path, ref: str) -> Path:
    if not path.is_dir():
        raise ConfigError(f"model path {ref!r} is a file, not a model folder; pass the folder that holds config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{ref!r} is not a model folder: it has no config.json")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"{ref!r} is not a model folder: it has no *.safetensors weights")
    return path.resolve()


def read_model_config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{model_dir}/config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(f"{model_dir}/config.json has no model_type, so it is not a model config")
    known = supported_model_types()
    if known and config["model_type"] not in known:
        raise ConfigError(
            f"model type {config['model_type']!r} ({model_dir}) is not one MLX-LM {_mlx_lm_version()} can load; "
            "use a model of a supported architecture (llama, qwen2, mistral, gemma, phi3, ...)"
        )
    return config


@cache
def supported_model_types() -> frozenset[str]:
    """The model types mlx-lm loads: its model modules, and the names it remaps to them, read from its source so
    that checking a model never imports MLX (empty when mlx-lm is not installed: then nothing is refused here)."""
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    package = Path(next(iter(spec.submodule_search_locations)))
    types = {p.stem for p in (package / "models").glob("*.py") if not p.stem.startswith("_")}
    tree = ast.parse((package / "utils.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODEL_REMAPPING" for t in node.targets):
            types |= set(ast.literal_eval(node.value))
    return frozenset(types)


def _mlx_lm_version() -> str:
    try:
        return metadata.version("mlx-lm")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def num_hidden_layers(config: dict[str, Any]) -> int | None:
    value = config.get("num_hidden_layers", config.get("text_config", {}).get("num_hidden_layers"))
    return int(value) if value is not None else None
