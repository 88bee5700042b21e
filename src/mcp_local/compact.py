"""Smaller tool schemas for tools/list (every byte of it is in every conversation).

Inputs keep everything a model needs to fill them in (types, bounds, enums, descriptions, defaults) except caps that
only stop absurd input (a 10-million-iteration maximum); pydantic's generated titles go, `anyOf [T, null]` becomes a
nullable type, or just T where null is the default (an optional argument is left out, not sent as null). Outputs are
described one level deep: each field's name and type, nested objects and lists as such (their fields and items are in
the JSON itself), so the tool list does not repeat the same nested definitions tool after tool; a result's fields are
all present, so `required` and defaults are left out.
"""

from __future__ import annotations

import json
from typing import Any

_NAMED = ("properties", "$defs", "patternProperties")  # mappings of names to schemas: a key here is not a keyword
#: bounds at or above these only stop absurd input; the listing leaves them out (pydantic still checks them)
_SANITY_CAPS = {"maximum": 100_000, "exclusiveMaximum": 100_000, "maxLength": 1024}
_NUMBERS = ("default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def compact_schema(schema: Any) -> Any:
    return _walk(_inline_single_use(schema), names=False, inputs=True)  # inlined first: a nullable enum reads as one


def _inline_single_use(schema: Any) -> Any:
    """A definition referenced once is written in place (shared ones stay in $defs)."""
    if not isinstance(schema, dict) or not schema.get("$defs"):
        return schema
    text = json.dumps(schema)
    defs = dict(schema["$defs"])
    once = {name for name in defs if text.count(f'"#/$defs/{name}"') == 1}

    def place(node: Any) -> Any:
        if isinstance(node, list):
            return [place(item) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref", "")
        name = ref.rsplit("/", 1)[-1] if ref.startswith("#/$defs/") else None
        if name in once:
            return {**place(defs[name]), **{k: place(v) for k, v in node.items() if k != "$ref"}}
        return {k: place(v) for k, v in node.items() if k != "$defs"}

    out = place(schema)
    kept = {name: place(d) for name, d in defs.items() if name not in once}
    return {**out, "$defs": kept} if kept else out


def shallow_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """An output schema one level deep, without $defs, enums or descriptions (the values are in the result itself,
    and the tool's description says what it returns)."""
    defs = schema.get("$defs", {})
    top = {
        k: v
        for k, v in _walk(schema, names=False, inputs=False).items()
        if k not in ("$defs", "required", "description")
    }
    top["properties"] = {name: _shallow(prop, defs) for name, prop in top.get("properties", {}).items()}
    return top


def _shallow(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    # a result has values, not defaults; its fields are named to read without a description (the tool's says more)
    prop = {k: v for k, v in prop.items() if k not in ("default", "description", "enum")}
    described: dict[str, Any] = {}
    nullable = "anyOf" in prop
    inner = next((o for o in prop.get("anyOf", [prop]) if o != {"type": "null"}), prop)
    ref = inner.get("$ref")
    if ref is not None:
        target = defs.get(ref.rsplit("/", 1)[-1], {})
        kind: dict[str, Any] = {"type": "string"} if "enum" in target else {"type": "object"}
    elif inner.get("type") in ("array", "object"):  # its items' or values' types are in the JSON itself
        kind = {"type": inner["type"]}
    else:
        return prop
    if nullable:
        kind = _or_null(kind)
    return {**kind, **described}


def _walk(node: Any, names: bool, inputs: bool) -> Any:
    if isinstance(node, list):
        return [_walk(item, names=False, inputs=inputs) for item in node]
    if not isinstance(node, dict):
        return node
    if names:
        return {name: _walk(value, names=False, inputs=inputs) for name, value in node.items()}
    out = {key: _walk(value, names=key in _NAMED, inputs=inputs) for key, value in node.items() if key != "title"}
    if out.get("additionalProperties") is True:  # JSON Schema's default
        del out["additionalProperties"]
    for key, cap in _SANITY_CAPS.items():
        if isinstance(out.get(key), int | float) and out[key] >= cap:
            del out[key]  # a cap against absurd input only: still enforced by the server
    for key in _NUMBERS:  # 60.0 is written 60: the same JSON number, two bytes fewer
        if isinstance(out.get(key), float) and out[key].is_integer():
            out[key] = int(out[key])
    return _nullable(out, inputs)


def _nullable(node: dict[str, Any], inputs: bool) -> dict[str, Any]:
    options = node.get("anyOf")
    if not isinstance(options, list) or len(options) != 2 or {"type": "null"} not in options:
        return node
    other = next(o for o in options if o != {"type": "null"})
    if not isinstance(other.get("type"), str) or "$ref" in other:
        return node
    merged = {k: v for k, v in node.items() if k != "anyOf"}
    if inputs and "default" in merged and merged["default"] is None:  # an argument left out is the null
        return {**other, **{k: v for k, v in merged.items() if k != "default"}}
    return {**_or_null(other), **merged}


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema, accepting null too (an enum lists it: `enum` alone decides what it accepts)."""
    nullable = {**schema, "type": [schema["type"], "null"]}
    if "enum" in schema:
        nullable["enum"] = [*schema["enum"], None]
    return nullable
