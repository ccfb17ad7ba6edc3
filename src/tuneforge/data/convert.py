"""alpaca, sharegpt and table rows to OpenAI `messages`."""

from __future__ import annotations

import string
from typing import Any

from tuneforge.data.records import Problem

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "tool": "tool",
}


def from_alpaca(record: Any, where: str) -> tuple[dict | None, Problem | None]:
    if not isinstance(record, dict):
        return None, Problem(where, "data_type", f"record is {type(record).__name__}, not an object")
    missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
    if missing:
        return None, Problem(
            where, "alpaca_missing_field", f"alpaca record lacks text in {', '.join(repr(m) for m in missing)}"
        )
    user = record["instruction"].strip()
    extra = record.get("input")
    if isinstance(extra, str) and extra.strip():
        user = f"{user}\n\n{extra.strip()}"
    messages = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.append({"role": "system", "content": record["system"].strip()})
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    return {"messages": messages, **_passthrough(record)}, None


def from_sharegpt(record: Any, where: str) -> tuple[dict | None, Problem | None]:
    if not isinstance(record, dict):
        return None, Problem(where, "data_type", f"record is {type(record).__name__}, not an object")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return None, Problem(where, "sharegpt_missing_conversations", "no non-empty 'conversations' list")
    messages = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.append({"role": "system", "content": record["system"]})
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return None, Problem(where, "sharegpt_bad_turn", f"turn {i} needs 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            return None, Problem(
                where,
                "unrecognized_role",
                f"turn {i} is from {turn['from']!r}; known: {', '.join(sorted(SHAREGPT_ROLES))}",
            )
        messages.append({"role": role, "content": turn["value"]})
    return {"messages": messages, **_passthrough(record)}, None


def _passthrough(record: dict) -> dict:
    return {k: record[k] for k in ("id", "label", "meta") if k in record}


def template_fields(text: str) -> list[str]:
    """Column names a template refers to, e.g. "Review: {review}" -> ["review"]."""
    return [name for _, name, _, _ in string.Formatter().parse(text) if name]


def render_row(template, row: dict[str, str]) -> list[dict[str, str]]:
    """A table row through the experiment's template into messages."""
    messages = []
    if template.system is not None:
        messages.append({"role": "system", "content": template.system.format_map(row)})
    messages.append({"role": "user", "content": template.user.format_map(row)})
    messages.append({"role": "assistant", "content": template.assistant.format_map(row)})
    return messages
