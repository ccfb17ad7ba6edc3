"""Unpaired preference examples (for KTO): one answer to a prompt, labelled desirable or undesirable.

Two shapes are read. tuneforge's, which `tuneforge feedback export` writes from thumbs:

    {"messages": [...the prompt..., {"role": "assistant", "content": "..."}], "label": true}

and TRL's unpaired preference format, `{"prompt": ..., "completion": ..., "label": ...}`, where the
prompt is a list of messages or a string (one user turn) and the completion a list holding one
assistant message or a string. `label` is true for a desirable answer (a thumbs-up) and false for an
undesirable one (a thumbs-down).

Both become the conversation `prompt + [answer]`, checked by the same rules as supervised examples.
Only the final answer is judged, so earlier assistant turns of the prompt become context
(`weight: 0`, OpenAI's mark), and the prepared file keeps `label` beside the messages.
"""

from __future__ import annotations

from typing import Any

from tuneforge.data.records import Problem
from tuneforge.data.validate import check_record

TUNEFORGE_KEYS = {"messages", "label"}
TRL_KEYS = {"prompt", "completion", "label"}
PASSTHROUGH = ("id", "meta", "tools", "parallel_tool_calls")


def desirability(label: bool) -> str:
    """The class name a KTO example carries in reports and stratified splits."""
    return "desirable" if label else "undesirable"


def read_unpaired(record: Any, where: str) -> tuple[dict | None, list[Problem]]:
    """(record as {"messages": prompt + [answer], "label": bool, ...passthrough}, problems); None on an error."""
    if not isinstance(record, dict):
        return None, [Problem(where, "data_type", f"record is {type(record).__name__}, not an object")]
    problems: list[Problem] = []
    if "messages" in record:
        messages, known = record["messages"], TUNEFORGE_KEYS
    elif "prompt" in record or "completion" in record:
        messages, known = _trl_messages(record, where, problems), TRL_KEYS
    else:
        return None, [
            Problem(where, "kto_missing_input", f"no 'messages' nor 'prompt'/'completion'; keys: {sorted(record)[:8]}")
        ]
    label = record.get("label")
    if "label" not in record:
        problems.append(Problem(where, "kto_missing_label", "no 'label': true (desirable) or false (undesirable)"))
    elif not isinstance(label, bool):
        problems.append(
            Problem(where, "kto_label_not_bool", f"'label' is {label!r}; it must be true (desirable) or false")
        )
    for key in record:
        if key not in known and key not in PASSTHROUGH:
            message = f"key {key!r} is not part of the format and is dropped"
            problems.append(Problem(where, "record_unrecognized_key", message, "warning"))
    if messages is not None:
        problems += check_record({"messages": messages, **_extras(record)}, where)
    if messages is None or any(p.severity == "error" for p in problems):
        return None, problems
    out = {"messages": as_context(messages), "label": label, **_extras(record)}
    out.update({k: record[k] for k in ("id", "meta") if k in record})
    return out, problems


def as_context(messages: list[dict]) -> list[dict]:
    """The conversation with every assistant turn before the last one marked context (`weight: 0`)."""
    last = len(messages) - 1
    return [
        {**m, "weight": 0} if i < last and isinstance(m, dict) and m.get("role") == "assistant" else dict(m)
        for i, m in enumerate(messages)
    ]


def _extras(record: dict) -> dict:
    return {k: record[k] for k in ("tools", "parallel_tool_calls") if k in record}


def _trl_messages(record: dict, where: str, problems: list[Problem]) -> list | None:
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}] if prompt.strip() else []
    if not isinstance(prompt, list) or not prompt:
        problems.append(Problem(where, "kto_empty_prompt", "'prompt' must be a non-empty string or list of messages"))
        return None
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    elif isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, list) or len(completion) != 1:
        count = len(completion) if isinstance(completion, list) else type(completion).__name__
        problems.append(
            Problem(where, "kto_completion_count", f"'completion' must hold exactly one assistant message, not {count}")
        )
        return None
    return [*prompt, *completion]
