"""Which paths a request may name: inside the allowed roots once resolved (`..` and symlinks followed), real files or
folders (never a device, pipe or socket), and an adapter folder that holds no other adapter."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError


def reject_nul(value: str, what: str) -> None:
    """No file name holds a NUL byte; the OS would refuse it with a bare ValueError deep in the call."""
    if "\x00" in value:
        raise ConfigError(f"{what} {value!r} contains a NUL byte (\\x00), which no path can; pass the real path")


@dataclass(frozen=True)
class PathPolicy:
    """`roots` None: any path (the CLI, where the user is the caller); else only paths under one of them."""

    roots: tuple[Path, ...] | None = None

    def check(self, path: Path, what: str) -> Path:
        """The resolved path, or a ConfigError naming it, the roots and how to allow it."""
        reject_nul(str(path), what)
        resolved = path.expanduser().resolve()
        if path.exists():
            mode = resolved.stat().st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise ConfigError(f"{what} {str(path)!r} is not a file or folder (a device, pipe or socket)")
        if self.roots is not None and not any(resolved.is_relative_to(root) for root in self.roots):
            roots = ", ".join(str(root) for root in self.roots)
            raise ConfigError(
                f"{what} {str(path)!r} resolves to {str(resolved)!r}, outside the server's allowed roots ({roots}); "
                "move it under one, or start the server with --root FOLDER (repeatable) to allow its folder"
            )
        return resolved

    def check_folder(self, folder: Path, what: str) -> Path:
        """`check`, and every file directly in the folder too: a symlink inside an allowed folder pointing outside
        the roots would let a tool read (and a reply or error show) a file the server may not."""
        resolved = self.check(folder, what)
        if self.roots is not None and resolved.is_dir():
            for entry in resolved.iterdir():
                if entry.is_symlink():
                    self.check(entry, f"{what} file")
        return resolved


def check_adapter_dir(
    folder: Path, runs_dir: Path, policy: PathPolicy, protected: dict[str, Path] | None = None
) -> Path:
    """An adapter folder of its own: allowed, not inside another run's folder, holding no adapter yet, and neither
    one of the `protected` folders (the server's home, the model's, the dataset's) nor a folder above one."""
    resolved = policy.check(folder, "adapter_dir")
    for what, other in {"the server's home": runs_dir.parent, **(protected or {})}.items():
        if other.resolve().is_relative_to(resolved):
            raise ConfigError(
                f"adapter_dir {str(folder)!r} is {what} ({other}) or a folder above it: a run's adapter must not mix "
                "with those files; pick a new or empty folder of its own (e.g. a subfolder named after the run)"
            )
    if resolved.is_relative_to(runs_dir.resolve()):
        raise ConfigError(
            f"adapter_dir {str(folder)!r} is inside a run's folder ({runs_dir}); leave adapter_dir unset to write to "
            "this run's own folder, or pick a folder of your own"
        )
    if (resolved / "adapters.safetensors").exists() or (resolved / "adapter_config.json").exists():
        raise ConfigError(
            f"adapter_dir {str(folder)!r} already holds an adapter; pick a new or empty folder (nothing is overwritten)"
        )
    return resolved
