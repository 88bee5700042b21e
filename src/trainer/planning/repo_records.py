"""Training records from one source file, in three formats.

- `completion`: the file cut at definition boundaries (Python: top-level statements by `ast`; other languages: a
  blank line followed by a line that starts at column 0) into `text` chunks of at most `max_chars`.
- `fim`: each chunk as fill-in-the-middle (prefix, suffix, middle), in the model's own FIM tokens.
- `instruct` (Python only): each function or method with a docstring becomes a chat: signature and docstring asked,
  the body answered; the two together parse back to the function.

Each record names its `file` (held-out figures are bootstrapped over files); instruct records also name the function
and its body's lines (an evaluation with a test command puts a generated body in their place). MLX-LM's
loaders ignore these keys.
"""

from __future__ import annotations

import ast
import random
import textwrap
from collections.abc import Iterator
from typing import Any

#: FIM token spellings by family: Qwen2.5-Coder's, StarCoder's and CodeLlama's
FIM_TOKENS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<PRE>", "<SUF>", "<MID>"),
)
INSTRUCT_ASK = "Write the body of this Python function from `{file}`:\n\n```python\n{head}```"


def _first_line(node: ast.stmt) -> int:
    """A statement's first line, 0-based, its decorators included."""
    decorators: list[ast.expr] = getattr(node, "decorator_list", [])
    return min([node.lineno] + [d.lineno for d in decorators]) - 1


def _python_blocks(text: str) -> list[str] | None:
    """Top-level statements with the comments and blank lines before each; None if the file does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    lines = text.splitlines(keepends=True)
    starts = [_first_line(n) for n in tree.body]
    if not starts:
        return [text]
    cuts = [0, *starts[1:], len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(cuts, cuts[1:], strict=False) if a < b]


def _generic_blocks(text: str) -> list[str]:
    blocks: list[str] = []
    current: list[str] = []
    previous_blank = False
    for line in text.splitlines(keepends=True):
        if previous_blank and line[:1].strip() and current:
            blocks.append("".join(current))
            current = []
        current.append(line)
        previous_blank = not line.strip()
    if current:
        blocks.append("".join(current))
    return blocks


def chunks(text: str, language: str, max_chars: int) -> list[str]:
    """The file in pieces of at most `max_chars`, cut between definitions where it can, between lines where not."""
    blocks = (_python_blocks(text) if language == "python" else None) or _generic_blocks(text)
    out: list[str] = []
    current = ""
    for block in blocks:
        if len(block) > max_chars:  # one definition over the budget: cut it between lines
            pieces = _by_lines(block, max_chars)
        else:
            pieces = [block]
        for piece in pieces:
            if current and len(current) + len(piece) > max_chars:
                out.append(current)
                current = ""
            current += piece
    if current.strip():
        out.append(current)
    return [c for c in out if c.strip()]


def _by_lines(block: str, max_chars: int) -> list[str]:
    pieces, current = [], ""
    for line in block.splitlines(keepends=True):
        if current and len(current) + len(line) > max_chars:
            pieces.append(current)
            current = ""
        current += line[:max_chars]
    return pieces + ([current] if current else [])


def fim_tokens(vocabulary: set[str]) -> tuple[str, str, str] | None:
    """The model's FIM tokens (prefix, suffix, middle), if its vocabulary has a full set."""
    return next((tokens for tokens in FIM_TOKENS if all(t in vocabulary for t in tokens)), None)


def fim_record(chunk: str, tokens: tuple[str, str, str], rng: random.Random) -> dict[str, str]:
    """Prefix-suffix-middle: a span of whole lines is the middle to fill."""
    lines = chunk.splitlines(keepends=True)
    start = rng.randrange(len(lines))
    end = rng.randrange(start, len(lines)) + 1
    prefix, middle, suffix = "".join(lines[:start]), "".join(lines[start:end]), "".join(lines[end:])
    pre, suf, mid = tokens
    return {"text": f"{pre}{prefix}{suf}{suffix}{mid}{middle}"}


def instruct_records(text: str, relative: str) -> Iterator[dict[str, Any]]:
    """A chat per documented function or method: its signature and docstring asked, its body answered."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = text.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or ast.get_docstring(node) is None:
            continue
        docstring, rest = node.body[0], node.body[1:]
        if not rest:
            continue  # a docstring alone: nothing to write
        first = _first_line(node)
        head = textwrap.dedent("".join(lines[first : docstring.end_lineno]))
        indent = len(lines[first]) - len(lines[first].lstrip())
        body = "".join(_outdent(line, indent) for line in lines[rest[0].lineno - 1 : node.end_lineno])
        if not body.endswith("\n"):
            body += "\n"
        yield {
            "messages": [
                {"role": "user", "content": INSTRUCT_ASK.format(file=relative, head=head)},
                {"role": "assistant", "content": f"```python\n{body}```"},
            ],
            # where the body stands in the repository, so an evaluation can put a generated one in its place
            "file": relative,
            "function": node.name,
            "body_lines": [rest[0].lineno, node.end_lineno],
        }


def _outdent(line: str, indent: int) -> str:
    if not line.strip():
        return "\n"
    return line[indent:] if not line[:indent].strip() else line


def records(
    text: str, language: str, relative: str, fmt: str, max_chars: int, fim: tuple[str, str, str] | None, seed: int
) -> list[dict[str, Any]]:
    if fmt == "instruct":
        return list(instruct_records(text, relative)) if language == "python" else []
    pieces = chunks(text, language, max_chars)
    if fmt == "fim":
        assert fim is not None
        rng = random.Random(f"{seed}:{relative}")
        return [{**fim_record(piece, fim, rng), "file": relative} for piece in pieces]
    return [{"text": piece, "file": relative} for piece in pieces]
