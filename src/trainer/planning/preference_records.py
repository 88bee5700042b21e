"""Preference records, in the common JSONL layouts: {"prompt": text, "chosen": text, "rejected": text} (TRL's
standard), with the prompt as a list of chat messages instead (TRL's conversational, or "messages"), and each reply
as text, one {"role": "assistant", "content": text} message, or a list holding one."""

from __future__ import annotations

from typing import Any

LAYOUTS = {
    "text": '{"prompt": str, "chosen": str, "rejected": str}',
    "conversational": '{"prompt" or "messages": [{"role", "content"}, ...], "chosen": ..., "rejected": ...}',
}


def is_preference(record: dict[str, Any]) -> bool:
    return "chosen" in record and "rejected" in record


def prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The prompt as chat messages; ValueError naming what is wrong."""
    prompt = record.get("prompt", record.get("messages"))
    if isinstance(prompt, str) and prompt:
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(_is_message(m) for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise ValueError(
        'a preference record needs "prompt" (text) or "prompt"/"messages" (a non-empty list of {"role": str, '
        '"content": str}), besides "chosen" and "rejected"'
    )


def completion_text(value: object) -> str:
    """A reply's text: text, one assistant message, or a list of one; ValueError otherwise."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and _is_message(value):
        value = value["content"]
    if isinstance(value, str) and value:
        return value
    raise ValueError('"chosen" and "rejected" must each be a non-empty reply: text, or one {"role", "content"} message')


def layout_of(record: dict[str, Any]) -> str:
    """Which layout the record is in (after it was checked)."""
    return "text" if isinstance(record.get("prompt"), str) else "conversational"


def check_record(record: dict[str, Any]) -> None:
    """ValueError saying what is wrong with a preference record, if anything."""
    prompt_messages(record)
    for key in ("chosen", "rejected"):
        completion_text(record[key])
    if completion_text(record["chosen"]) == completion_text(record["rejected"]):
        raise ValueError('"chosen" and "rejected" are the same reply, so the pair prefers nothing')


def _is_message(value: object) -> bool:
    return isinstance(value, dict) and isinstance(value.get("role"), str) and isinstance(value.get("content"), str)
