"""The checker for the bundled dataset's house style, which SmolLM2-135M-Instruct does not follow by itself.

House style: answer with exactly one ```python block and no prose around it; the code parses; it defines the asked
function; every argument and the return value are type-hinted; the function has a one-line docstring.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from pydantic import BaseModel

_FENCED = re.compile(r"\A```python\n(?P<code>.*?)\n```\Z", re.S)
_ANY_FENCE = re.compile(r"```(?:python)?\n(?P<code>.*?)(?:\n```|\Z)", re.S)


class HouseStyleScore(BaseModel):
    code_only: bool
    parses: bool
    defines_function: bool
    type_hinted: bool
    one_line_docstring: bool

    @property
    def score(self) -> float:
        checks = (self.code_only, self.parses, self.defines_function, self.type_hinted, self.one_line_docstring)
        return sum(checks) / len(checks)


class HeldoutPrompt(BaseModel):
    prompt: str
    function: str


def score_reply(reply: str, function: str) -> HouseStyleScore:
    text = reply.strip()
    fenced = _FENCED.match(text)
    loose = fenced or _ANY_FENCE.search(text)
    code = loose.group("code") if loose else text
    try:
        tree: ast.Module | None = ast.parse(code)
    except SyntaxError:
        tree = None
    fn = None
    if tree is not None:
        fn = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function), None)
    typed = fn is not None and fn.returns is not None and all(a.annotation is not None for a in fn.args.args)
    doc = ast.get_docstring(fn) if fn is not None else None
    return HouseStyleScore(
        code_only=fenced is not None,
        parses=tree is not None,
        defines_function=fn is not None,
        type_hinted=typed,
        one_line_docstring=bool(doc) and "\n" not in (doc or ""),
    )


def load_heldout(data_dir: Path) -> list[HeldoutPrompt]:
    lines = (data_dir / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    return [HeldoutPrompt.model_validate(json.loads(line)) for line in lines if line.strip()]
