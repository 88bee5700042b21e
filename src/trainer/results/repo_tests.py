"""A repository's own tests against a generated function body: on a temporary copy, one body at a time.

The copy is made once; for each function its file gets the generated body in place of the real one (re-indented to
the real body's indent), the test command runs (results/sandbox.py: limits, a fresh environment, no network), and the
file is put back. The untouched copy must pass first: a command that fails there says nothing about the bodies.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import textwrap
from pathlib import Path
from types import TracebackType

from ..errors import ConfigError
from .sandbox import Outcome, run_command_sandboxed


class RepoTests:
    def __init__(self, source: Path, command: str, timeout_s: float = 300.0) -> None:
        self.source = source
        self.argv = shlex.split(command)
        if not self.argv:
            raise ConfigError("test_command is empty; pass the command that runs the repository's tests")
        self.timeout_s = timeout_s
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self.copy = Path()

    def __enter__(self) -> RepoTests:
        self._scratch = tempfile.TemporaryDirectory(prefix="repo-tests-")
        self.copy = Path(self._scratch.name) / "repo"
        try:
            self._check_baseline()
        except BaseException:
            self._scratch.cleanup()
            raise
        return self

    def _check_baseline(self) -> None:
        shutil.copytree(self.source, self.copy, symlinks=True, ignore=shutil.ignore_patterns(".git"))
        baseline = run_command_sandboxed(self.argv, self.copy, timeout_s=self.timeout_s)
        if not baseline.passed:
            last = next((line for line in reversed(baseline.output.splitlines()) if line.strip()), "")
            raise ConfigError(
                f"test_command {shlex.join(self.argv)!r} does not pass on the untouched repository ({baseline.outcome}:"
                f" {last[-200:]}); fix it, or leave test_command out"
            )

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()

    def outcome_with(self, file: str, body_lines: tuple[int, int], body: str) -> Outcome:
        """The tests' outcome with lines `body_lines` (1-based, inclusive) of `file` replaced by `body`."""
        path = (self.copy / file).resolve()
        if not path.is_relative_to(self.copy.resolve()) or not path.is_file():
            raise ConfigError(f"file {file!r} of a held-out function is not in the repository {str(self.source)!r}")
        original = path.read_bytes()
        lines = original.decode("utf-8").splitlines(keepends=True)
        first, last = body_lines
        real = lines[first - 1]
        indent = real[: len(real) - len(real.lstrip())]
        fresh = textwrap.indent(textwrap.dedent(body).rstrip("\n") + "\n", indent)
        try:
            path.write_text("".join(lines[: first - 1]) + fresh + "".join(lines[last:]), encoding="utf-8")
            return run_command_sandboxed(self.argv, self.copy, timeout_s=self.timeout_s).outcome
        finally:
            path.write_bytes(original)
