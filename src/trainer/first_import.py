"""First imports of the heavy libraries, one thread at a time.

mlx-lm's modules import each other in cycles and transformers resolves its names lazily on first use: two of the
server's tool threads importing them at once can see a half-initialised module ("cannot import name 'load'",
"cannot import name 'AutoTokenizer'"). Every such first import in this process goes through this one lock.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Any

_lock = threading.RLock()
_done: set[str] = set()


def import_once(name: str) -> ModuleType:
    if name in _done:
        return importlib.import_module(name)
    with _lock:
        module = importlib.import_module(name)
        _done.add(name)
        return module


def attribute_once(module: str, name: str) -> Any:
    """`from module import name`, for a module that imports its names lazily."""
    key = f"{module}:{name}"
    if key in _done:
        return getattr(importlib.import_module(module), name)
    with _lock:
        value = getattr(importlib.import_module(module), name)
        _done.add(key)
        return value
