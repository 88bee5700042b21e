"""How close a generated function body is to the real one: exact after `ast` normalization, and a token similarity.

- Exact: both bodies parse, and their `ast.dump` (no positions, comments or formatting) are equal.
- Similarity: difflib's ratio (2 x matched / total) over the bodies' Python tokens (`tokenize`), so layout and
  comments do not count; 1.0 is identical code.
A reply that repeats the whole function is cut to its body first (its docstring dropped), as the reference is.
"""

from __future__ import annotations

import ast
import difflib
import io
import re
import textwrap
import tokenize

#: a fenced code block of a chat reply; an unclosed one (the reply cut at max_tokens) runs to the end
CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)
_SKIPPED = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def code_blocks(reply: str) -> list[str]:
    return list(CODE_BLOCK.findall(reply))


def closed_code_block(text: str) -> bool:
    """Whether a reply so far has a whole code block: generation can stop there."""
    return text.count("```") >= 2


def reply_code(reply: str) -> str:
    """The first code block of a chat reply (an unclosed one runs to the end), or the whole reply."""
    blocks = code_blocks(reply)
    return blocks[0] if blocks else reply


def body_of(code: str, function: str | None = None) -> str:
    """`code` as a function body, dedented: a whole `def` (the named one, or the only one) becomes its body without
    the docstring."""
    text = textwrap.dedent(code)
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    chosen = next((d for d in defs if d.name == function), defs[0] if len(defs) == 1 == len(tree.body) else None)
    if chosen is None:
        return text
    body = chosen.body[1:] if ast.get_docstring(chosen) is not None and len(chosen.body) > 1 else chosen.body
    lines = text.splitlines(keepends=True)
    return textwrap.dedent("".join(lines[body[0].lineno - 1 : chosen.end_lineno]))


def _normalized(body: str) -> str | None:
    try:
        return ast.dump(ast.parse(textwrap.dedent(body)))
    except SyntaxError:
        return None


def exact_match(generated: str, reference: str) -> bool:
    ours, theirs = _normalized(generated), _normalized(reference)
    return ours is not None and ours == theirs


def _tokens(code: str) -> list[str]:
    try:
        return [t.string for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type not in _SKIPPED]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return code.split()


def similarity(generated: str, reference: str) -> float:
    ours, theirs = _tokens(textwrap.dedent(generated)), _tokens(textwrap.dedent(reference))
    if not ours and not theirs:
        return 1.0
    return difflib.SequenceMatcher(None, ours, theirs, autojunk=False).ratio()
